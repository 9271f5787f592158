/* stress_client.c: the generating clients of `rlb stress`, honest and hostile.
 *
 * `rlb stress --role client` connects as a tool and, until SIGTERM, sends batches of 1 to 3
 * requests at once with random prompts, n, lengths, temperatures, top-k / top-p, seeds,
 * stop ids, logprobs and minimum versions (and now and then a request that must be
 * refused, naming its field), or puts the workers to sleep for a moment and wakes them.
 * Every request has a deadline. For each it reports SUBMIT, then ANSWER once: the code,
 * how long it took, the weight versions stamped on its samples and whether the samples are
 * whole (every (prompt, index) once, in order; lengths and finish reasons consistent with
 * max_tokens and the stop ids; logprobs iff asked). When the bridge is gone it connects to
 * the next one.
 *
 * The hostile client (rlb__stress_hostile), forked by the supervisor, speaks the raw
 * protocol through common/conn.h and common/ring.h to commit what an honest peer never
 * does: random bytes, a message cut short, a record header announcing more bytes than it
 * holds, the first fragment of a message followed by a hang-up, a request followed by a
 * hang-up.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/atomics.h"
#include "common/conn.h"
#include "common/proto.h"
#include "launch/stress.h"

#define GEN_DEADLINE_MS 30000 /* a request answers within this, whatever the faults */
#define VOCAB 250             /* the tiny model's */
#define MAX_PROMPTS 3
#define MAX_PROMPT_LEN 12
#define MAX_STOP 3
#define MAX_BATCH 3

/* One request of a batch and the storage its arrays point into. */
typedef struct pending {
    int32_t tokens[MAX_PROMPTS][MAX_PROMPT_LEN];
    rlb_prompt prompts[MAX_PROMPTS];
    int32_t stop[MAX_STOP];
    rlb_sampling_params sp;
    rlb_generate_request req;
    int invalid;       /* built to be refused */
    rlb_ticket ticket; /* 0: not submitted */
    double t0;         /* submit time */
} pending;

static void random_request(pending *q, uint64_t *s, uint64_t min_version)
{
    rlb_sampling_params_init(&q->sp);
    q->sp.n = 1 + rlb__stress_below(s, 4);
    q->sp.max_tokens = 1 + rlb__stress_below(s, 24);
    q->sp.temperature = rlb__stress_below(s, 4) == 0 ? 0.0f
                                                    : 0.3f + rlb__stress_below(s, 120) / 100.0f;
    q->sp.top_k = rlb__stress_below(s, 2) ? -1 : 1 + (int32_t)rlb__stress_below(s, 50);
    q->sp.top_p = rlb__stress_below(s, 2) ? 1.0f : 0.5f + rlb__stress_below(s, 50) / 100.0f;
    q->sp.seed = (int64_t)(rlb__stress_rand(s) >> 33);
    q->sp.logprobs = rlb__stress_below(s, 2) ? -1 : 0;
    q->sp.n_stop_token_ids = rlb__stress_below(s, MAX_STOP + 1);
    for (uint32_t i = 0; i < q->sp.n_stop_token_ids; i++)
        q->stop[i] = (int32_t)rlb__stress_below(s, VOCAB);
    q->sp.stop_token_ids = q->stop;
    uint32_t np = 1 + rlb__stress_below(s, MAX_PROMPTS);
    for (uint32_t p = 0; p < np; p++) {
        uint32_t len = 1 + rlb__stress_below(s, MAX_PROMPT_LEN);
        for (uint32_t i = 0; i < len; i++)
            q->tokens[p][i] = (int32_t)rlb__stress_below(s, VOCAB);
        q->prompts[p] = (rlb_prompt){q->tokens[p], len};
    }
    /* One request in 20 is refused by the bridge, which must name the field: a token or a
     * stop id outside the vocabulary, or more tokens than the model's length. */
    q->invalid = rlb__stress_below(s, 20) == 0;
    if (q->invalid) {
        switch (rlb__stress_below(s, 3)) {
        case 0: q->tokens[0][0] = VOCAB + (int32_t)rlb__stress_below(s, 1000); break;
        case 1:
            q->stop[0] = VOCAB + (int32_t)rlb__stress_below(s, 1000);
            q->sp.n_stop_token_ids = q->sp.n_stop_token_ids ? q->sp.n_stop_token_ids : 1;
            break;
        default: q->sp.max_tokens = 100000; break;
        }
    }
    rlb_generate_request_init(&q->req);
    q->req.prompts = q->prompts;
    q->req.n_prompts = np;
    q->req.sampling = &q->sp;
    q->req.min_weight_version = min_version;
}

static int is_stop(const pending *q, int32_t t)
{
    for (uint32_t i = 0; i < q->sp.n_stop_token_ids; i++)
        if (q->stop[i] == t)
            return 1;
    return 0;
}

/* Checks a result against its request; fills the record's versions, samples and flags. */
static void check_result(const pending *q, const rlb_result *res, rlb_stress_rec *rec)
{
    size_t n = rlb_result_num_samples(res);
    rec->count = (uint32_t)n;
    rec->vmin = UINT64_MAX;
    int bad = n != (size_t)q->req.n_prompts * q->sp.n;
    for (size_t i = 0; !bad && i < n; i++) {
        const rlb_sample *s = rlb_result_sample(res, i);
        bad = !s || s->prompt != i / q->sp.n || s->index != i % q->sp.n ||
              s->n_tokens > q->sp.max_tokens || (q->sp.logprobs >= 0) != (s->logprobs != NULL);
        if (bad)
            break;
        for (uint32_t k = 0; k < s->n_tokens; k++)
            bad |= s->tokens[k] < 0 || s->tokens[k] >= VOCAB ||
                   (k + 1 < s->n_tokens && is_stop(q, s->tokens[k]));
        if (s->finish == RLB_REASON_LENGTH)
            bad |= s->n_tokens != q->sp.max_tokens;
        else if (s->finish == RLB_REASON_STOP)
            bad |= s->n_tokens == 0 || !is_stop(q, s->tokens[s->n_tokens - 1]);
        rec->vmin = s->weight_version < rec->vmin ? s->weight_version : rec->vmin;
        rec->vmax = s->weight_version > rec->vmax ? s->weight_version : rec->vmax;
    }
    if (bad) {
        rec->flags |= RLB_REC_F_BAD_SHAPE;
        snprintf(rec->text, sizeof(rec->text), "%zu samples for %u prompts x n %u, or a sample "
                 "out of order, too long or with a wrong finish reason", n, q->req.n_prompts,
                 q->sp.n);
    }
    if (rec->vmin == UINT64_MAX)
        rec->vmin = 0;
}

/* Waits for q's answer and reports it. Returns the code. */
static int await(rlb_client *c, pending *q)
{
    rlb_result *res = NULL;
    double left = GEN_DEADLINE_MS - (rlb__clock_ms_f() - q->t0);
    int rc = rlb_generate_wait(c, q->ticket, left > 0 ? (int)left : 0, &res);
    rlb_stress_rec rec = {.kind = RLB_REC_ANSWER, .rc = rc, .ms = rlb__clock_ms_f() - q->t0,
                          .flags = q->invalid ? RLB_REC_F_EXPECT_REFUSAL : 0};
    if (rc == 0)
        check_result(q, res, &rec);
    else {
        snprintf(rec.text, sizeof(rec.text), "%s", rlb_last_error(c));
        if (!rlb__stress_named(rc, rec.text))
            rec.flags |= RLB_REC_F_UNNAMED;
    }
    rlb_result_free(res);
    rlb__stress_send(&rec);
    return rc;
}

/* One batch: submit 1..MAX_BATCH requests, then wait for each. Returns 1 when some request
 * was served, 0 when none was (all refused, failed or past their deadline), or
 * RLB_EPEERDEAD when the bridge is gone. */
static int batch(rlb_client *c, uint64_t *s)
{
    int served = 0;
    static pending q[MAX_BATCH];
    uint32_t nq = 1 + rlb__stress_below(s, MAX_BATCH);
    int dead = 0;
    for (uint32_t i = 0; i < nq; i++) {
        uint64_t minv = rlb__stress_below(s, 3) == 0 ? rlb_weight_version(c) : 0;
        random_request(&q[i], s, minv);
        q[i].t0 = rlb__clock_ms_f();
        q[i].ticket = 0;
        if (dead)
            continue;
        int rc = rlb_generate_submit(c, &q[i].req, &q[i].ticket);
        rlb_stress_rec rec = {.kind = RLB_REC_SUBMIT, .rc = rc};
        rlb__stress_send(&rec);
        if (rc < 0) {
            q[i].ticket = 0;
            rec = (rlb_stress_rec){.kind = RLB_REC_ANSWER, .rc = rc,
                                   .flags = q[i].invalid ? RLB_REC_F_EXPECT_REFUSAL : 0};
            snprintf(rec.text, sizeof(rec.text), "%s", rlb_last_error(c));
            if (!rlb__stress_named(rc, rec.text))
                rec.flags |= RLB_REC_F_UNNAMED;
            rlb__stress_send(&rec);
            dead = rc == RLB_EPEERDEAD;
        }
    }
    for (uint32_t i = 0; i < nq; i++) {
        int rc = q[i].ticket ? await(c, &q[i]) : -1;
        dead |= rc == RLB_EPEERDEAD;
        served |= rc == 0;
    }
    return dead ? RLB_EPEERDEAD : served;
}

/* Puts the workers to sleep for a moment and wakes them. */
static int sleep_wake(rlb_client *c, uint64_t *s)
{
    double t0 = rlb__clock_ms_f();
    int rc = rlb_sleep(c);
    if (rc == 0) {
        rlb__stress_sleep_ms(20 + (int)rlb__stress_below(s, 180));
        rc = rlb_wake(c);
    }
    rlb_stress_rec rec = {.kind = RLB_REC_SLEEP, .rc = rc, .ms = rlb__clock_ms_f() - t0};
    if (rc < 0)
        snprintf(rec.text, sizeof(rec.text), "%s", rlb_last_error(c));
    rlb__stress_send(&rec);
    return rc;
}

int rlb__stress_client(int argc, char **argv)
{
    rlb_stress_role_opts ro;
    if (rlb__stress_role_parse(argc, argv, &ro))
        return 2;
    /* A restarted client draws other requests than the one it replaces. */
    uint64_t s = rlb__stress_key(ro.seed, 0x636c69656e74ull /* "client" */, ro.id, (uint64_t)getpid());
    rlb_client_options o;
    rlb__stress_tool_options(&o, ro.socket);
    rlb_client *cl = NULL;
    int backoff_ms = 0; /* after batches nothing of was served: refusals are not retried hot */
    while (!rlb__stress_stopping()) {
        if (!cl) {
            if (rlb_connect(&o, &cl) < 0) {
                cl = NULL;
                rlb__stress_sleep_ms(100);
                continue;
            }
            rlb_stress_rec rec = {.kind = RLB_REC_CONNECTED};
            rlb__stress_send(&rec);
        }
        int is_batch = rlb__stress_below(&s, 12) != 0;
        int rc = is_batch ? batch(cl, &s) : sleep_wake(cl, &s);
        if (rc == RLB_EPEERDEAD) {
            rlb_close(cl);
            cl = NULL;
        }
        if (is_batch && rc == 0) { /* 5, 10, ... up to 200 ms while nothing is served */
            backoff_ms = backoff_ms ? (backoff_ms * 2 > 200 ? 200 : backoff_ms * 2) : 5;
            rlb__stress_sleep_ms(backoff_ms);
        } else if (is_batch) {
            backoff_ms = 0;
        }
    }
    rlb_close(cl);
    return 0;
}

/* ---- The hostile client ---------------------------------------------------------------- */

/* Publishes a record whose header says (len_field, type_word) over `used` payload bytes
 * already written into the open claim: what commit does, without its checks. */
static void raw_publish(rlb_ring *r, uint32_t len_field, uint32_t type_word, size_t used)
{
    rlb__ring_rec rec = {.len = len_field, .type = type_word, .seq = r->seq++};
    memcpy(r->data + (r->claim_at & (r->capacity - 1)), &rec, sizeof(rec));
    r->index = r->claim_at + sizeof(rec) + (used + RLB_RING_ALIGN - 1) / RLB_RING_ALIGN *
                                              RLB_RING_ALIGN;
    r->claim_open = 0;
    /* Pairs with the bridge's load_acquire of the producer index: header and payload. */
    rlb_store_release(&r->shm->prod.index, r->index);
}

static int hostile_hello(rlb_conn *c)
{
    uint8_t buf[256];
    size_t len;
    rlb_msg hello = {.type = RLB_MSG_HELLO,
                     .hello = {.abi_version = RLB_ABI_VERSION, .role = RLB_ROLE_TOOL}};
    rlb_ring_rx rx = {.max_msg = 1 << 20};
    rlb_ring_msg m;
    int rc = rlb__msg_pack(&hello, buf, sizeof(buf), &len);
    if (rc == 0)
        rc = rlb__ring_send(rlb__conn_tx(c), RLB_MSG_HELLO, buf, len, 2000);
    if (rc == 0 && (rc = rlb__ring_recv(rlb__conn_rx(c), &rx, 5000, &m)) == 0)
        rlb__ring_recv_done(rlb__conn_rx(c), &rx);
    rlb__ring_rx_free(&rx);
    return rc;
}

/* A valid GENERATE, packed into buf. Returns its length or 0. */
static size_t pack_generate(uint8_t *buf, size_t cap)
{
    static const int32_t tokens[4] = {3, 1, 4, 1};
    rlb_msg_prompt p = {.tokens = tokens, .n_tokens = 4};
    rlb_msg g = {.type = RLB_MSG_GENERATE,
                 .generate = {.request_id = 1, .n_prompts = 1, .prompts = &p,
                              .sampling = {.n = 2, .max_tokens = 16, .temperature = 1.0f,
                                           .top_p = 1.0f, .seed = 7}}};
    size_t len = 0;
    return rlb__msg_pack(&g, buf, cap, &len) == 0 ? len : 0;
}

int rlb__stress_hostile(const char *socket, uint32_t kind, uint32_t arg)
{
    rlb_conn *c;
    if (rlb__conn_connect(socket, 2000, &c) < 0)
        return 1;
    if (hostile_hello(c) < 0) {
        rlb__conn_close(c);
        return 1;
    }
    rlb_ring *tx = rlb__conn_tx(c);
    uint8_t msg[512];
    size_t len = pack_generate(msg, sizeof(msg));
    uint64_t s = arg;
    void *slot;
    size_t cap;
    int rc = rlb__ring_claim(tx, 4096, 2000, &slot, &cap);
    if (rc < 0 || tx->claim_at != tx->index || len == 0) {
        rlb__conn_close(c);
        return 1;
    }
    uint8_t *p = slot;
    int variant = (int)(arg >> 16 & 1);
    switch (kind) {
    case RLB_FAULT_GARBAGE: {
        size_t n = 1 + rlb__stress_below(&s, 512);
        for (size_t i = 0; i < n; i++)
            p[i] = (uint8_t)rlb__stress_rand(&s);
        rlb__ring_commit(tx, 1 + rlb__stress_below(&s, RLB_MSG_SHUTDOWN), n);
        break;
    }
    case RLB_FAULT_TRUNCATED:
        memcpy(p, msg, len);
        if (variant == 0) /* a message cut short */
            rlb__ring_commit(tx, RLB_MSG_GENERATE, 1 + rlb__stress_below(&s, (uint32_t)len - 1));
        else /* a header announcing far more than the record holds */
            raw_publish(tx, (uint32_t)(len + 64 + rlb__stress_below(&s, 1u << 30)),
                        RLB_MSG_GENERATE, len);
        break;
    case RLB_FAULT_DISCONNECT:
        if (variant == 0) { /* the first fragment of a large message, then nothing */
            uint64_t total = 3 * rlb__ring_max_payload(tx);
            memcpy(p, &total, sizeof(total));
            memcpy(p + sizeof(total), msg, len);
            raw_publish(tx, (uint32_t)(sizeof(total) + len), RLB_MSG_GENERATE | RLB_RING_F_FIRST,
                        sizeof(total) + len);
        } else { /* a request whose requester leaves before the answer */
            rlb__ring_commit(tx, RLB_MSG_GENERATE, len);
        }
        break;
    default: rlb__ring_abort(tx); break;
    }
    /* Give the bridge a moment to read it before the socket closes under it. */
    rlb__stress_sleep_ms(variant ? 5 : 50);
    rlb__conn_close(c);
    return 0;
}
