/* generate.c: generation requests (DESIGN §6): sampling parameters checked and put on the
 * wire, one ticket per request collecting its samples from one or more result messages,
 * and the result object handed to the caller.
 *
 * A ticket completes when the bridge marks a result `done`; it must then hold every
 * (prompt, sample index) pair exactly once, or the request fails with RLB_EPROTO rather
 * than hand out a partial answer. An error message carrying the request id fails it.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "client/client_internal.h"
#include "common/check.h"

#define MAX_SAMPLES_PER_PROMPT 65536 /* n */
#define MAX_STOP_IDS 4096            /* stop_token_ids entries */

_Static_assert((int)RLB_REASON_STOP == (int)RLB_MSG_FINISH_STOP &&
                   (int)RLB_REASON_LENGTH == (int)RLB_MSG_FINISH_LENGTH &&
                   (int)RLB_REASON_ABORT == (int)RLB_MSG_FINISH_ABORT,
               "public finish reasons are the wire's");
/* Token and stop id arrays go on the wire as they are in memory. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "little-endian host");

struct rlb__ticket {
    uint64_t id;           /* request id on the wire (the public ticket) */
    uint32_t n_prompts;    /* prompts in the request */
    uint32_t n;            /* samples per prompt */
    int logprobs;          /* logprobs were asked for */
    int state;             /* 0 pending, 1 complete, < 0 failed with that code */
    char text[256];        /* failure text */
    uint64_t n_have;       /* samples received */
    uint8_t *have;         /* [n_prompts * n] 1 once that sample arrived */
    rlb_sample *samples;   /* [n_prompts * n] prompt-major; arrays owned */
};

struct rlb_result {
    size_t n;             /* samples */
    rlb_sample *samples;  /* [n]; tokens and logprobs arrays owned */
};

RLB_API void rlb_sampling_params_init(rlb_sampling_params *params)
{
    if (params)
        *params = (rlb_sampling_params)RLB_SAMPLING_PARAMS_INIT;
}

RLB_API void rlb_generate_request_init(rlb_generate_request *req)
{
    if (req)
        *req = (rlb_generate_request)RLB_GENERATE_REQUEST_INIT;
}

RLB_API const char *rlb_finish_reason_name(rlb_finish_reason reason)
{
    switch (reason) {
    case RLB_REASON_STOP: return "stop";
    case RLB_REASON_LENGTH: return "length";
    case RLB_REASON_ABORT: return "abort";
    default: return "?";
    }
}

/* ---- results ----------------------------------------------------------------------------- */

static void free_samples(rlb_sample *s, size_t n)
{
    for (size_t i = 0; s && i < n; i++) {
        free((void *)s[i].tokens);
        free((void *)s[i].logprobs);
    }
    free(s);
}

RLB_API void rlb_result_free(rlb_result *result)
{
    if (!result)
        return;
    free_samples(result->samples, result->n);
    free(result);
}

RLB_API size_t rlb_result_num_samples(const rlb_result *result)
{
    return result ? result->n : 0;
}

RLB_API const rlb_sample *rlb_result_sample(const rlb_result *result, size_t i)
{
    return result && i < result->n ? &result->samples[i] : NULL;
}

/* ---- tickets ----------------------------------------------------------------------------- */

static void ticket_free(rlb__ticket *t)
{
    if (!t)
        return;
    free_samples(t->samples, (size_t)t->n_prompts * t->n);
    free(t->have);
    free(t);
}

static int64_t ticket_index(rlb_client *c, uint64_t id)
{
    for (uint32_t i = 0; i < c->n_tickets; i++)
        if (c->tickets[i]->id == id)
            return i;
    return -1;
}

static void ticket_remove(rlb_client *c, uint32_t i)
{
    ticket_free(c->tickets[i]);
    c->tickets[i] = c->tickets[--c->n_tickets];
}

static void ticket_fail(rlb__ticket *t, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void ticket_fail(rlb__ticket *t, int code, const char *fmt, ...)
{
    if (t->state != 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->text, sizeof(t->text), fmt, ap);
    va_end(ap);
    t->state = code;
}

/* Copies one sample of a result message into its slot. */
static void take_sample(rlb__ticket *t, const rlb_msg_sample *s)
{
    if (s->prompt >= t->n_prompts || s->index >= t->n)
        return ticket_fail(t, RLB_EPROTO, "result names sample %u of prompt %u; the request "
                           "had %u prompts of %u samples", s->index, s->prompt, t->n_prompts,
                           t->n);
    size_t k = (size_t)s->prompt * t->n + s->index;
    if (t->have[k])
        return ticket_fail(t, RLB_EPROTO, "sample %u of prompt %u arrived twice", s->index,
                           s->prompt);
    if (t->logprobs && s->n_logprobs != s->n_tokens)
        return ticket_fail(t, RLB_EPROTO, "sample %u of prompt %u has %u logprobs for %u "
                           "tokens", s->index, s->prompt, s->n_logprobs, s->n_tokens);
    rlb_sample *out = &t->samples[k];
    int32_t *tok = malloc((size_t)s->n_tokens * sizeof(int32_t) + 1);
    float *lp = t->logprobs ? malloc((size_t)s->n_tokens * sizeof(float) + 1) : NULL;
    if (!tok || (t->logprobs && !lp)) {
        free(tok);
        free(lp);
        return ticket_fail(t, RLB_ENOMEM, "no memory for a result of %u tokens", s->n_tokens);
    }
    for (uint32_t i = 0; i < s->n_tokens; i++) {
        tok[i] = rlb__msg_i32(s->tokens, i);
        if (lp)
            lp[i] = rlb__msg_f32(s->logprobs, i);
    }
    *out = (rlb_sample){.prompt = s->prompt,
                        .index = s->index,
                        .tokens = tok,
                        .n_tokens = s->n_tokens,
                        .logprobs = lp,
                        .finish = (rlb_finish_reason)s->finish,
                        .weight_version = s->weight_version};
    t->have[k] = 1;
    t->n_have++;
}

void rlb__ticket_on_result(rlb_client *c, const rlb_msg_result *res)
{
    int64_t i = ticket_index(c, res->request_id);
    if (i < 0) {
        RLB_LOG_DEBUG(RLB_SUB_CLIENT, "result for unknown request %llu dropped",
                      (unsigned long long)res->request_id);
        return;
    }
    rlb__ticket *t = c->tickets[i];
    for (uint32_t k = 0; k < res->n_samples && t->state == 0; k++)
        take_sample(t, &res->samples[k]);
    if (!res->done || t->state != 0)
        return;
    uint64_t want = (uint64_t)t->n_prompts * t->n;
    if (t->n_have != want)
        return ticket_fail(t, RLB_EPROTO, "the bridge finished request %llu with %llu of "
                           "%llu samples", (unsigned long long)t->id,
                           (unsigned long long)t->n_have, (unsigned long long)want);
    t->state = 1;
}

int rlb__ticket_on_error(rlb_client *c, uint64_t id, int code, const char *text)
{
    int64_t i = ticket_index(c, id);
    if (i < 0)
        return 0;
    /* RLB_EAGAIN means "still running" to a poller, so a refusal for now is reported as
     * an abort (the text says why). */
    ticket_fail(c->tickets[i], code == RLB_EAGAIN ? RLB_EABORTED : code,
                "bridge refused generate request %llu: %s", (unsigned long long)id, text);
    return 1;
}

void rlb__tickets_fail_all(rlb_client *c, int code)
{
    for (uint32_t i = 0; i < c->n_tickets; i++)
        ticket_fail(c->tickets[i], code, "connection to the bridge lost");
}

void rlb__tickets_free_all(rlb_client *c)
{
    for (uint32_t i = 0; i < c->n_tickets; i++)
        ticket_free(c->tickets[i]);
    free(c->tickets);
    c->tickets = NULL;
    c->n_tickets = c->cap_tickets = 0;
}

/* ---- submit -------------------------------------------------------------------------------- */

static int check_sampling(rlb_client *c, const rlb_sampling_params *p)
{
    RLB_CHECK(rlb__check_struct_size(c, p->struct_size, sizeof(*p), sizeof(*p),
                                     "rlb_sampling_params"));
    if (p->n < 1 || p->n > MAX_SAMPLES_PER_PROMPT)
        return rlb__fail(c, RLB_EINVAL, "n = %u: 1..%d samples per prompt", p->n,
                         MAX_SAMPLES_PER_PROMPT);
    if (!isfinite(p->temperature) || p->temperature < 0)
        return rlb__fail(c, RLB_EINVAL, "temperature must be finite and >= 0");
    if (!isfinite(p->top_p) || !(p->top_p > 0 && p->top_p <= 1))
        return rlb__fail(c, RLB_EINVAL, "top_p must be in (0, 1]");
    if (p->top_k < -1)
        return rlb__fail(c, RLB_EINVAL, "top_k = %d: -1 or 0 (all) or a positive count",
                         p->top_k);
    if (p->seed < -1)
        return rlb__fail(c, RLB_EINVAL, "seed = %lld: >= 0, or -1 for a random one",
                         (long long)p->seed);
    if (p->max_tokens < 1)
        return rlb__fail(c, RLB_EINVAL, "max_tokens must be >= 1");
    if (p->n_stop_token_ids > MAX_STOP_IDS || (p->n_stop_token_ids && !p->stop_token_ids))
        return rlb__fail(c, RLB_EINVAL, "stop_token_ids: at most %d ids, and the array with "
                                        "them", MAX_STOP_IDS);
    if (p->logprobs > 0)
        return rlb__fail(c, RLB_EUNSUPPORTED, "logprobs = %d: only the sampled token's logprob "
                                              "(logprobs = 0) is returned", p->logprobs);
    if (p->logprobs < -1)
        return rlb__fail(c, RLB_EINVAL, "logprobs = %d: -1 (none) or 0", p->logprobs);
    return 0;
}

static uint64_t random_seed(void)
{
    uint64_t s;
    if (getrandom(&s, sizeof(s), 0) == (ssize_t)sizeof(s))
        return s >> 1;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ((uint64_t)ts.tv_sec * 1000000007u ^ (uint64_t)ts.tv_nsec) >> 1;
}

/* The wire form of req (prompt arrays point at the caller's memory). */
static int build(rlb_client *c, const rlb_generate_request *req, const rlb_sampling_params *p,
                 rlb_msg *msg, rlb_msg_prompt *prompts)
{
    for (uint32_t i = 0; i < req->n_prompts; i++) {
        const rlb_prompt *pr = &req->prompts[i];
        if (!pr->tokens || pr->n_tokens < 1)
            return rlb__fail(c, RLB_EINVAL, "prompt %u is empty", i);
        for (uint32_t k = 0; k < pr->n_tokens; k++)
            if (pr->tokens[k] < 0)
                return rlb__fail(c, RLB_EINVAL, "prompt %u: token %u is negative (%d)", i, k,
                                 pr->tokens[k]);
        prompts[i] = (rlb_msg_prompt){.tokens = pr->tokens, .n_tokens = pr->n_tokens};
    }
    *msg = (rlb_msg){.type = RLB_MSG_GENERATE};
    msg->generate = (rlb_msg_generate){
        .min_weight_version = req->min_weight_version,
        .sampling = {.n = p->n,
                     .max_tokens = p->max_tokens,
                     .temperature = p->temperature,
                     .top_p = p->top_p,
                     .top_k = p->top_k > 0 ? (uint32_t)p->top_k : 0,
                     .seed = p->seed >= 0 ? (uint64_t)p->seed : random_seed(),
                     .stop = p->stop_token_ids,
                     .n_stop = p->n_stop_token_ids,
                     .logprobs = p->logprobs == 0},
        .n_prompts = req->n_prompts,
        .prompts = prompts};
    return 0;
}

static rlb__ticket *ticket_new(uint32_t n_prompts, uint32_t n, int logprobs)
{
    rlb__ticket *t = calloc(1, sizeof(*t));
    size_t total = (size_t)n_prompts * n;
    if (!t)
        return NULL;
    *t = (rlb__ticket){.n_prompts = n_prompts, .n = n, .logprobs = logprobs};
    t->have = calloc(total, 1);
    t->samples = calloc(total, sizeof(*t->samples));
    if (!t->have || !t->samples) {
        ticket_free(t);
        return NULL;
    }
    return t;
}

RLB_API int rlb_generate_submit(rlb_client *client, const rlb_generate_request *req,
                                rlb_ticket *ticket)
{
    if (!client)
        return RLB_EINVAL;
    rlb_client *c = client;
    if (!req || !ticket)
        return rlb__fail(c, RLB_EINVAL, "rlb_generate_submit needs a request and a ticket");
    *ticket = 0;
    RLB_CHECK(rlb__check_struct_size(c, req->struct_size, sizeof(*req), sizeof(*req),
                                     "rlb_generate_request"));
    if (!req->prompts || req->n_prompts < 1)
        return rlb__fail(c, RLB_EINVAL, "a request needs at least one prompt");
    rlb_sampling_params defaults = RLB_SAMPLING_PARAMS_INIT;
    const rlb_sampling_params *p = req->sampling ? req->sampling : &defaults;
    RLB_CHECK(check_sampling(c, p));
    if ((uint64_t)req->n_prompts * p->n > (1u << 24))
        return rlb__fail(c, RLB_ETOOBIG, "%u prompts x %u samples is over %u samples",
                         req->n_prompts, p->n, 1u << 24);
    rlb_msg_prompt *prompts = calloc(req->n_prompts, sizeof(*prompts));
    rlb__ticket *t = ticket_new(req->n_prompts, p->n, p->logprobs == 0);
    rlb_msg msg;
    int rc = RLB_ENOMEM;
    if (!prompts || !t) {
        rlb__fail(c, rc, "no memory for a request of %u prompts", req->n_prompts);
        goto err;
    }
    RLB_CHECK_GOTO(build(c, req, p, &msg, prompts), rc, err);

    pthread_mutex_lock(&c->lock);
    rc = c->dead ? c->dead
                 : rlb__grow(&c->tickets, &c->cap_tickets, c->n_tickets + 1, sizeof(*c->tickets));
    if (rc == 0) {
        t->id = rlb__next_id(c);
        c->tickets[c->n_tickets++] = t;
    }
    pthread_mutex_unlock(&c->lock);
    if (rc < 0) {
        rlb__fail(c, rc, "cannot submit a request");
        goto err;
    }
    uint64_t id = t->id;
    msg.generate.request_id = id;
    rc = rlb__send(c, &msg, c->request_timeout_ms);
    free(prompts);
    if (rc < 0) {
        pthread_mutex_lock(&c->lock);
        int64_t i = ticket_index(c, id);
        if (i >= 0)
            ticket_remove(c, (uint32_t)i);
        pthread_mutex_unlock(&c->lock);
        return rc;
    }
    *ticket = id;
    return 0;
err:
    free(prompts);
    ticket_free(t);
    return rc;
}

static int ticket_settled(rlb_client *c, void *arg)
{
    int64_t i = ticket_index(c, *(const uint64_t *)arg);
    return i < 0 || c->tickets[i]->state != 0;
}

/* Hands out a settled ticket's result (or failure) and forgets the ticket (c->lock held). */
static int collect(rlb_client *c, uint32_t i, rlb_result **out)
{
    rlb__ticket *t = c->tickets[i];
    int rc = t->state;
    if (rc < 0) {
        rlb__fail_locked(c, rc, "%s", t->text);
    } else {
        rlb_result *r = malloc(sizeof(*r));
        if (!r) {
            rc = rlb__fail_locked(c, RLB_ENOMEM, "no memory for a result");
        } else {
            r->n = (size_t)t->n_prompts * t->n;
            r->samples = t->samples;
            t->samples = NULL;
            c->stats.requests++;
            c->stats.samples += r->n;
            for (size_t k = 0; k < r->n; k++)
                c->stats.tokens += r->samples[k].n_tokens;
            *out = r;
            rc = 0;
        }
    }
    ticket_remove(c, i);
    return rc;
}

RLB_API int rlb_generate_wait(rlb_client *client, rlb_ticket ticket, int timeout_ms,
                              rlb_result **out)
{
    if (!client)
        return RLB_EINVAL;
    rlb_client *c = client;
    if (!out)
        return rlb__fail(c, RLB_EINVAL, "rlb_generate_wait needs an output pointer");
    *out = NULL;
    pthread_mutex_lock(&c->lock);
    int rc = rlb__wait(c, ticket_settled, &ticket, timeout_ms);
    int64_t i = ticket_index(c, ticket);
    if (i < 0)
        rc = rlb__fail_locked(c, RLB_ENOTFOUND, "ticket %llu is unknown or already collected",
                              (unsigned long long)ticket);
    else if (c->tickets[i]->state != 0)
        rc = collect(c, (uint32_t)i, out);
    else if (rc == RLB_ETIMEDOUT)
        rlb__fail_locked(c, rc, "request %llu not complete within %d ms",
                         (unsigned long long)ticket, timeout_ms);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

RLB_API int rlb_generate_poll(rlb_client *client, rlb_ticket ticket, rlb_result **out)
{
    return rlb_generate_wait(client, ticket, 0, out);
}

RLB_API int rlb_generate(rlb_client *client, const rlb_generate_request *req, int timeout_ms,
                         rlb_result **out)
{
    rlb_ticket t;
    RLB_CHECK(rlb_generate_submit(client, req, &t));
    int rc = rlb_generate_wait(client, t, timeout_ms, out);
    if (rc == RLB_ETIMEDOUT) {
        /* Nobody else knows this ticket: forget it, so a late result is dropped. */
        pthread_mutex_lock(&client->lock);
        int64_t i = ticket_index(client, t);
        if (i >= 0)
            ticket_remove(client, (uint32_t)i);
        pthread_mutex_unlock(&client->lock);
    }
    return rc;
}
