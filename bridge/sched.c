/* sched.c: generation requests between requesters (trainer ranks, tools) and the
 * workers' data-parallel replicas (DESIGN §6).
 *
 * A GENERATE gets a bridge-wide id (so two requesters' ids never collide on a worker), is
 * re-encoded once with it and sent, byte for byte the same, to every TP rank of the
 * least-loaded live replica (fewest requests in flight): the ranks see the same commands
 * in the same order and run them in lockstep. Only TP rank 0 answers; its RESULT goes back
 * to the requester under the requester's own id, whole, with the weight version the
 * worker stamped on every sample.
 *
 * A request naming a token or stop id outside the vocabulary, or asking for more tokens
 * than the model's length leaves after its prompt, is refused at once with the field named.
 *
 * A request is held in the bridge (in arrival order) while no replica may take it: during
 * a pause-mode sync, while a staged sync's load is in flight, until a version at least
 * min_weight_version has committed, while the workers sleep (until the wake), or before
 * any replica has formed. Before the first commit only a replica whose workers loaded a
 * checkpoint at start serves: with none, a request that does not wait for a version
 * (min_weight_version 0) fails with RLB_ENOTREADY once no sync is in flight, instead of
 * being answered from the zeros the workers hold.
 *
 * While the weights are stale (an aborted sync wrote them and no version committed since)
 * requests fail with RLB_ESTALE, also one that waited for a retry.
 *
 * Worker death: the socket reports it at once. The replica is taken out of service and
 * every request running on it is retried on another live replica; it had produced nothing
 * yet (a result is sent whole, when the request is done), so the requester sees one
 * complete result, possibly from a newer committed version. A request is retried at most
 * BR_MAX_RETRIES times: when its worker dies again it fails with RLB_EABORTED, so a request
 * that kills the worker running it cannot take the whole fleet down. When no replica is
 * left, the request fails with an ERROR (RLB_ENOREPLICA). Either way nothing waits for a
 * dead worker.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bridge/bridge_int.h"
#include "common/log.h"

#define STALE_TEXT "the workers' weights are stale after an aborted sync; publish a new " \
                   "version first"

uint32_t br_inflight(const bridge *b)
{
    uint32_t n = 0;
    for (uint32_t d = 0; d < b->n_replicas; d++)
        n += b->replicas[d].inflight;
    return n;
}

static br_gen *gen_find(bridge *b, uint64_t bid)
{
    for (uint32_t i = 0; i < b->n_gens; i++)
        if (b->gens[i].bid == bid)
            return &b->gens[i];
    return NULL;
}

/* Removes gens[i], keeping the others in arrival order. */
static void gen_remove(bridge *b, uint32_t i)
{
    free(b->gens[i].packed);
    memmove(&b->gens[i], &b->gens[i + 1], (b->n_gens - i - 1) * sizeof(*b->gens));
    b->n_gens--;
}

/* 1 when replica d may serve: up, and holding weights (a committed version, or the
 * checkpoint its workers loaded at start). */
static int serves(const bridge *b, uint32_t d)
{
    return b->replicas[d].state == BR_REP_UP && (b->committed > 0 || b->replicas[d].has_weights);
}

/* Serving replica with the fewest requests in flight, or -1. */
static int pick_replica(const bridge *b)
{
    int best = -1;
    for (uint32_t d = 0; d < b->n_replicas; d++)
        if (serves(b, d) && (best < 0 || b->replicas[d].inflight < b->replicas[best].inflight))
            best = (int)d;
    return best;
}

/* 1 when replicas are up but none holds weights, and no sync is bringing the first ones. */
static int no_weights(const bridge *b)
{
    if (b->committed > 0 || b->sync != BR_SYNC_IDLE)
        return 0;
    int up = 0;
    for (uint32_t d = 0; d < b->n_replicas; d++)
        up += b->replicas[d].state == BR_REP_UP;
    return up > 0;
}

static int any_replica_possible(const bridge *b)
{
    if (!b->ever_up)
        return 1; /* workers are still starting */
    for (uint32_t d = 0; d < b->n_replicas; d++)
        if (b->replicas[d].state != BR_REP_DEAD)
            return 1;
    return 0;
}

/* Answers gens[i]'s requester with an ERROR and forgets the request. */
static void gen_fail(bridge *b, uint32_t i, int code, const char *text)
{
    br_gen *g = &b->gens[i];
    br_peer *req = br_peer_by_id(b, g->peer);
    if (req)
        br_send_error(b, req, code, g->cid, RLB_MSG_GENERATE, "generate %" PRIu64 ": %s",
                      g->cid, text);
    if (g->replica >= 0)
        b->replicas[g->replica].inflight--;
    b->n_failed++;
    gen_remove(b, i);
}

/* Refuses what the workers would otherwise cut or take silently: token and stop ids outside
 * the vocabulary, and prompt + max_tokens beyond the model's length (vLLM refuses those
 * too, rather than returning fewer tokens than asked). Returns 0, or RLB_EINVAL /
 * RLB_ETOOBIG with `why` naming the prompt and the field. */
static int check_request(const bridge *b, const rlb_msg_generate *g, char *why, size_t len)
{
    const rlb_model_config *cfg = &b->opts->cfg;
    for (uint32_t p = 0; p < g->n_prompts; p++) {
        const rlb_msg_prompt *pr = &g->prompts[p];
        const rlb_msg_sampling *sp = pr->sampling ? pr->sampling : &g->sampling;
        for (uint32_t i = 0; i < pr->n_tokens + sp->n_stop; i++) {
            int stop = i >= pr->n_tokens;
            int32_t id = stop ? rlb__msg_i32(sp->stop, i - pr->n_tokens)
                              : rlb__msg_i32(pr->tokens, i);
            if (id < 0 || id >= cfg->vocab)
                return snprintf(why, len, "prompt %u: %s %u is %d, outside the vocabulary "
                                "[0, %" PRId64 ")", p, stop ? "stop id" : "token",
                                stop ? i - pr->n_tokens : i, id, cfg->vocab), RLB_EINVAL;
        }
        if ((int64_t)pr->n_tokens + (int64_t)sp->max_tokens > cfg->max_pos)
            return snprintf(why, len, "prompt %u: %u prompt tokens + max_tokens %u exceed the "
                            "model's length of %" PRId64 " tokens", p, pr->n_tokens,
                            sp->max_tokens, cfg->max_pos), RLB_ETOOBIG;
    }
    return 0;
}

void br_generate(bridge *b, br_peer *p, rlb_msg *m)
{
    uint64_t cid = m->generate.request_id;
    char why[192];
    b->n_requests++;
    int bad = check_request(b, &m->generate, why, sizeof(why));
    if (bad < 0) {
        br_send_error(b, p, bad, cid, RLB_MSG_GENERATE, "generate %" PRIu64 ": %s", cid, why);
        b->n_failed++;
        return;
    }
    if (b->stale) {
        br_send_error(b, p, RLB_ESTALE, cid, RLB_MSG_GENERATE, "generate %" PRIu64 ": %s",
                      cid, STALE_TEXT);
        return;
    }
    if (!any_replica_possible(b)) {
        br_send_error(b, p, RLB_ENOREPLICA, cid, RLB_MSG_GENERATE, "generate %" PRIu64 ": no "
                      "live worker replica", cid);
        return;
    }
    if (b->n_gens == b->cap_gens) {
        uint32_t cap = b->cap_gens ? 2 * b->cap_gens : 64;
        br_gen *grown = realloc(b->gens, cap * sizeof(*grown));
        if (!grown) {
            br_send_error(b, p, RLB_ENOMEM, cid, RLB_MSG_GENERATE, "out of memory");
            return;
        }
        b->gens = grown;
        b->cap_gens = cap;
    }
    br_gen g = {.bid = b->next_bid++, .peer = p->id, .cid = cid,
                .minv = m->generate.min_weight_version, .replica = -1};
    m->generate.request_id = g.bid;
    size_t size;
    int rc = rlb__msg_packed_size(m, &size);
    if (rc == 0 && !(g.packed = malloc(size)))
        rc = RLB_ENOMEM;
    if (rc == 0)
        rc = rlb__msg_pack(m, g.packed, size, &g.len);
    if (rc < 0) {
        free(g.packed);
        br_send_error(b, p, rc, cid, RLB_MSG_GENERATE, "generate %" PRIu64 ": cannot forward "
                      "it (%s)", cid, rlb_strerror(rc));
        return;
    }
    b->gens[b->n_gens++] = g;
    br_dispatch(b);
}

int br_dispatch(bridge *b)
{
    if (b->stale) /* requests held when a replica died, retried: no weights to run them */
        br_fail_requests(b, RLB_ESTALE, 1, STALE_TEXT);
    if (br_sync_holds_generation(b) || b->asleep)
        return 0;
    int moved = 0;
    for (uint32_t i = 0; i < b->n_gens;) {
        br_gen *g = &b->gens[i];
        if (g->replica >= 0 || g->minv > b->committed) {
            i++;
            continue;
        }
        int d = pick_replica(b);
        if (d < 0 && no_weights(b)) {
            gen_fail(b, i, RLB_ENOTREADY, "the workers hold no weights yet (they started "
                     "without a checkpoint and no version has committed): publish a first "
                     "version, or ask for min_weight_version 1 to wait for it");
            moved = 1;
            continue;
        }
        if (d < 0)
            return moved;
        for (uint32_t t = 0; t < b->tp_size; t++)
            br_send_packed(b, b->replicas[d].ranks[t], RLB_MSG_GENERATE, g->packed, g->len);
        g->replica = d;
        b->replicas[d].inflight++;
        moved = 1;
        i++;
    }
    return moved;
}

void br_result(bridge *b, br_peer *w, rlb_msg *m)
{
    uint32_t i = 0;
    while (i < b->n_gens && b->gens[i].bid != m->result.request_id)
        i++;
    if (i == b->n_gens || b->gens[i].replica != (int)w->hello.replica) {
        RLB_LOG_DEBUG(RLB_SUB_BRIDGE, "dropping a result for unknown request %" PRIu64,
                      m->result.request_id);
        return;
    }
    br_gen *g = &b->gens[i];
    br_peer *req = br_peer_by_id(b, g->peer);
    if (req) {
        m->result.request_id = g->cid;
        br_send(b, req, m);
    }
    b->n_results++;
    if (m->result.done) {
        b->replicas[g->replica].inflight--;
        gen_remove(b, i);
    }
}

void br_worker_error(bridge *b, br_peer *w, const rlb_msg_error *m)
{
    if (!m->request_id && m->in_reply_to == RLB_MSG_LOAD) {
        br_load_refused(b, w, m->code, m->text);
        return;
    }
    br_gen *g = m->request_id ? gen_find(b, m->request_id) : NULL;
    if (!g) {
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "worker %u reports: %s (%s)", w->hello.rank, m->text,
                     rlb_strerror(m->code));
        return;
    }
    gen_fail(b, (uint32_t)(g - b->gens), m->code, m->text);
}

void br_replica_lost(bridge *b, int replica)
{
    int other = pick_replica(b) >= 0;
    for (uint32_t i = 0; i < b->n_gens;) {
        br_gen *g = &b->gens[i];
        if (g->replica != replica) {
            i++;
            continue;
        }
        if (!other) {
            gen_fail(b, i, RLB_ENOREPLICA, "its worker died and no other replica is live");
            continue;
        }
        if (g->retries >= BR_MAX_RETRIES) {
            gen_fail(b, i, RLB_EABORTED, "its worker died while running it, again after "
                     "the retry on another replica; it is not retried twice (a request that "
                     "kills workers would otherwise take every replica down)");
            continue;
        }
        RLB_LOG_INFO(RLB_SUB_BRIDGE, "request %" PRIu64 " of peer %u: retried on another "
                     "replica after its worker died", g->cid, g->peer);
        g->replica = -1;
        g->retries++;
        b->n_retried++;
        b->replicas[replica].inflight--;
        i++;
    }
    br_dispatch(b);
}

void br_requester_lost(bridge *b, br_peer *p)
{
    for (uint32_t i = 0; i < b->n_gens;) {
        br_gen *g = &b->gens[i];
        if (g->peer != p->id) {
            i++;
        } else if (g->replica < 0) {
            gen_remove(b, i);
        } else {
            g->peer = 0; /* runs to its end so the replica's load stays right; then dropped */
            i++;
        }
    }
}

void br_fail_requests(bridge *b, int code, int held_only, const char *text)
{
    for (uint32_t i = 0; i < b->n_gens;) {
        if (held_only && b->gens[i].replica >= 0)
            i++;
        else
            gen_fail(b, i, code, text);
    }
}
