/* engine.c: requests, sequences, the continuous-batching scheduler with preemption by
 * recompute, sampling and results (see engine.h for the policy).
 *
 * A sequence holds its whole token list (prompt + generated) and `computed`, the number
 * of leading tokens whose keys and values sit in its KV blocks. A step runs the span
 * [computed, computed + chunk); when that reaches the end of the list the step's logits
 * sample the next token. Prefill, decode and recompute after preemption are therefore the
 * same operation, and a preempted sequence resumes exactly where it stopped.
 * Check: tests/unit/test_engine_batch.c (batch independence, cache pressure, n samples,
 * stop ids, abort, sleep/wake) and test_engine_hf.c (greedy tokens against HF).
 */
#include "worker/engine.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/env.h"
#include "common/log.h"
#include "rlb/rlb.h"
#include "worker/backend_cpu.h"
#include "worker/kvcache.h"

typedef struct gen_seq gen_seq;

typedef struct gen_req {
    uint64_t id;          /* caller's id */
    int32_t *prompt;      /* [prompt_len] copy of the prompt */
    int64_t prompt_len;   /* tokens in the prompt */
    int32_t n;            /* samples */
    int32_t max_tokens;   /* generated tokens per sample at most */
    rlb_sampling sampling; /* temperature, top_k, top_p, seed */
    int32_t *stop_ids;    /* [n_stop] */
    int32_t n_stop;       /* stop ids */
    int logprobs;         /* return logprobs */
    gen_seq **seqs;       /* [n]; samples 1.. are NULL until the prompt forks */
    int32_t n_live;       /* samples not finished yet */
} gen_req;

struct gen_seq {
    gen_req *req;          /* owning request */
    int32_t sample;        /* sample index: part of the sampling noise key */
    int32_t *tokens;       /* [cap] prompt, then generated tokens */
    float *logprobs;       /* [cap] logprob of tokens[i] for generated i */
    int64_t len;           /* tokens known */
    int64_t cap;           /* allocated entries */
    int64_t computed;      /* leading tokens whose KV is cached */
    rlb_block_table blocks; /* KV blocks, in position order */
    rlb_finish finish;     /* RLB_FINISH_NONE while live */
};

typedef struct seq_list {
    gen_seq **items; /* [cap] */
    int64_t n;       /* entries in use; index 0 is the front / oldest */
    int64_t cap;     /* allocated entries */
} seq_list;

struct rlb_engine {
    rlb_forward fwd;           /* forward pass over the weights */
    rlb_kvcache kv;            /* paged KV cache */
    rlb_engine_opts opts;      /* options with defaults filled in */
    int64_t vocab;             /* V */
    gen_req **reqs;            /* [n_reqs] unfinished requests, in arrival order */
    int64_t n_reqs, cap_reqs;  /* entries in use / allocated */
    seq_list waiting;          /* sequences to (re)start, front first */
    seq_list running;          /* sequences holding KV blocks, oldest admitted first */
    rlb_gen_result **done;     /* [n_done] finished results, oldest first */
    int64_t n_done, cap_done;  /* entries in use / allocated */
    rlb_fwd_span *spans;       /* [cap_spans] this step's spans */
    gen_seq **span_seq;        /* [cap_spans] the sequence of each span */
    int64_t cap_spans;         /* allocated entries */
    rlb_sample_job *jobs;      /* [cap_jobs] this step's tokens to sample */
    gen_seq **job_seq;         /* [cap_jobs] the sequence of each job */
    int32_t *job_tok;          /* [cap_jobs] sampled tokens */
    float *job_lp;             /* [cap_jobs] their logprobs */
    int64_t n_jobs, cap_jobs;  /* entries in use / allocated */
    int asleep;                /* the KV cache is freed */
    int failed;                /* a forward pass failed: the engine refuses to step */
    rlb_engine_stats stats;    /* counters */
};

static int grow(void **p, int64_t *cap, int64_t need, size_t elem)
{
    if (*cap >= need)
        return 0;
    int64_t c = *cap ? *cap : 8;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, (size_t)c * elem);
    if (!q)
        return RLB_ENOMEM;
    *p = q;
    *cap = c;
    return 0;
}

static int list_insert(seq_list *l, int64_t at, gen_seq *s)
{
    if (grow((void **)&l->items, &l->cap, l->n + 1, sizeof *l->items))
        return RLB_ENOMEM;
    memmove(l->items + at + 1, l->items + at, (size_t)(l->n - at) * sizeof *l->items);
    l->items[at] = s;
    l->n++;
    return 0;
}

/* Removes s if present; returns 1 when it was. */
static int list_remove(seq_list *l, const gen_seq *s)
{
    for (int64_t i = 0; i < l->n; i++)
        if (l->items[i] == s) {
            memmove(l->items + i, l->items + i + 1, (size_t)(l->n - i - 1) * sizeof *l->items);
            l->n--;
            return 1;
        }
    return 0;
}

static gen_seq *seq_new(gen_req *r, int32_t sample)
{
    gen_seq *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->req = r;
    s->sample = sample;
    s->cap = r->prompt_len + r->max_tokens;
    s->tokens = malloc((size_t)s->cap * sizeof *s->tokens);
    s->logprobs = malloc((size_t)s->cap * sizeof *s->logprobs);
    if (!s->tokens || !s->logprobs) {
        free(s->tokens);
        free(s->logprobs);
        free(s);
        return NULL;
    }
    memcpy(s->tokens, r->prompt, (size_t)r->prompt_len * sizeof *s->tokens);
    s->len = r->prompt_len;
    return s;
}

static void seq_free(rlb_engine *e, gen_seq *s)
{
    if (!s)
        return;
    rlb__kv_release(&e->kv, &s->blocks);
    rlb__kv_table_free(&s->blocks);
    free(s->tokens);
    free(s->logprobs);
    free(s);
}

static void req_free(rlb_engine *e, gen_req *r)
{
    for (int32_t j = 0; j < r->n; j++)
        seq_free(e, r->seqs[j]);
    free(r->seqs);
    free(r->prompt);
    free(r->stop_ids);
    free(r);
}

void rlb__gen_result_free(rlb_gen_result *r)
{
    if (!r)
        return;
    for (int32_t j = 0; j < r->n; j++) {
        free(r->samples[j].tokens);
        free(r->samples[j].logprobs);
    }
    free(r->samples);
    free(r);
}

static int apply_threads(int32_t threads)
{
    long long n = threads > 0 ? threads : rlb__env_int(RLB_KNOB_THREADS);
    if (n <= 0)
        n = sysconf(_SC_NPROCESSORS_ONLN);
    openblas_set_num_threads(n > 0 ? (int)n : 1);
    return 0;
}

int rlb__engine_create_on(rlb_ebackend *b, const rlb_engine_opts *opts, rlb_engine **out)
{
    if (!b)
        return RLB_EINVAL;
    if (!opts || !out || opts->struct_size < sizeof(rlb_engine_opts) || opts->kv_bytes == 0 ||
        opts->block_tokens < 0 || opts->max_batch_tokens < 0 || opts->max_seqs < 0 ||
        opts->max_model_len < 0) {
        b->iface->destroy(b);
        return RLB_EINVAL;
    }
    const rlb_tp_layout *layout = b->layout;
    rlb_engine *e = calloc(1, sizeof *e);
    if (!e) {
        b->iface->destroy(b);
        return RLB_ENOMEM;
    }
    e->opts = *opts;
    if (!e->opts.block_tokens)
        e->opts.block_tokens = 16;
    if (!e->opts.max_batch_tokens)
        e->opts.max_batch_tokens = 512;
    if (!e->opts.max_seqs)
        e->opts.max_seqs = 256;
    if (!e->opts.max_model_len || e->opts.max_model_len > layout->cfg.max_pos)
        e->opts.max_model_len = layout->cfg.max_pos;
    e->vocab = layout->cfg.vocab;
    int rc = rlb__forward_init_on(&e->fwd, b);
    rlb_kv_mem mem = b->iface->kv_mem(b);
    if (!rc)
        rc = rlb__kv_init_mem(&e->kv, layout->cfg.n_layers, layout->kvt, layout->cfg.head_dim,
                              e->opts.block_tokens, opts->kv_bytes, &mem);
    if (rc) {
        rlb__forward_free(&e->fwd);
        free(e);
        return rc;
    }
    RLB_LOG_INFO(RLB_SUB_ENGINE, "tp rank %d/%d on %s: %lld KV blocks of %d tokens (%.1f MiB), "
                 "quant %s", layout->tp_rank, layout->tp_size, b->iface->name,
                 (long long)e->kv.n_blocks, e->opts.block_tokens,
                 (double)e->kv.n_blocks * (double)rlb__kv_bytes_per_block(&e->kv) / 1048576.0,
                 rlb__quant_name(opts->quant));
    *out = e;
    return 0;
}

int rlb__engine_create(const rlb_tp_layout *layout, const void *weights, rlb_tp_comm *comm,
                       const rlb_engine_opts *opts, rlb_engine **out)
{
    if (!layout || !opts || !out || opts->struct_size < sizeof(rlb_engine_opts))
        return RLB_EINVAL;
    apply_threads(opts->threads);
    rlb_ebackend *b = NULL;
    int rc = rlb__ebackend_cpu_create(layout, weights, comm, opts->quant, &b);
    return rc ? rc : rlb__engine_create_on(b, opts, out);
}

void rlb__engine_destroy(rlb_engine *e)
{
    if (!e)
        return;
    for (int64_t i = 0; i < e->n_reqs; i++)
        req_free(e, e->reqs[i]);
    for (int64_t i = 0; i < e->n_done; i++)
        rlb__gen_result_free(e->done[i]);
    free(e->reqs);
    free(e->done);
    free(e->waiting.items);
    free(e->running.items);
    free(e->spans);
    free(e->span_seq);
    free(e->jobs);
    free(e->job_seq);
    free(e->job_tok);
    free(e->job_lp);
    rlb__kv_free(&e->kv);
    rlb__forward_free(&e->fwd);
    free(e);
}

static gen_req *find_req(const rlb_engine *e, uint64_t id, int64_t *index)
{
    for (int64_t i = 0; i < e->n_reqs; i++)
        if (e->reqs[i]->id == id) {
            if (index)
                *index = i;
            return e->reqs[i];
        }
    return NULL;
}

static int check_request(const rlb_engine *e, const rlb_gen_request *q)
{
    if (!q->prompt || q->prompt_len < 1 || q->n < 1 || q->n > RLB_ENGINE_MAX_N ||
        q->max_tokens < 1 || q->n_stop < 0 || q->n_stop > RLB_ENGINE_MAX_STOP ||
        (q->n_stop && !q->stop_ids) || rlb__sampling_check(&q->sampling))
        return RLB_EINVAL;
    for (int64_t i = 0; i < q->prompt_len; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= e->vocab) {
            RLB_LOG_ERROR(RLB_SUB_ENGINE, "request %llu: prompt id %d at %lld is outside the "
                          "vocabulary [0, %lld)", (unsigned long long)q->id, q->prompt[i],
                          (long long)i, (long long)e->vocab);
            return RLB_EINVAL;
        }
    if (find_req(e, q->id, NULL))
        return RLB_EEXIST;
    if (q->prompt_len >= e->opts.max_model_len) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "request %llu: prompt of %lld tokens leaves no room "
                      "below max_model_len %lld", (unsigned long long)q->id,
                      (long long)q->prompt_len, (long long)e->opts.max_model_len);
        return RLB_ETOOBIG;
    }
    int64_t longest = q->prompt_len + q->max_tokens;
    if (longest > e->opts.max_model_len)
        longest = e->opts.max_model_len;
    if (rlb__kv_blocks_for(&e->kv, longest) > e->kv.n_blocks) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "request %llu: a sample of %lld tokens needs %lld KV "
                      "blocks, the cache has %lld", (unsigned long long)q->id,
                      (long long)longest, (long long)rlb__kv_blocks_for(&e->kv, longest),
                      (long long)e->kv.n_blocks);
        return RLB_ETOOBIG;
    }
    return 0;
}

int rlb__engine_add(rlb_engine *e, const rlb_gen_request *q)
{
    if (!e || !q)
        return RLB_EINVAL;
    int rc = check_request(e, q);
    if (rc)
        return rc;
    gen_req *r = calloc(1, sizeof *r);
    if (!r)
        return RLB_ENOMEM;
    r->id = q->id;
    r->prompt_len = q->prompt_len;
    r->n = q->n;
    r->max_tokens = q->max_tokens;
    r->sampling = q->sampling;
    r->n_stop = q->n_stop;
    r->logprobs = q->logprobs;
    r->n_live = q->n;
    r->prompt = malloc((size_t)q->prompt_len * sizeof *r->prompt);
    r->stop_ids = malloc((size_t)(q->n_stop + 1) * sizeof *r->stop_ids);
    r->seqs = calloc((size_t)q->n, sizeof *r->seqs);
    if (!r->prompt || !r->stop_ids || !r->seqs)
        goto nomem;
    memcpy(r->prompt, q->prompt, (size_t)q->prompt_len * sizeof *r->prompt);
    if (q->n_stop)
        memcpy(r->stop_ids, q->stop_ids, (size_t)q->n_stop * sizeof *r->stop_ids);
    /* Sample 0 prefills the prompt; the others fork from it when it is done. */
    if (!(r->seqs[0] = seq_new(r, 0)))
        goto nomem;
    if (grow((void **)&e->reqs, &e->cap_reqs, e->n_reqs + 1, sizeof *e->reqs) ||
        list_insert(&e->waiting, e->waiting.n, r->seqs[0]))
        goto nomem;
    e->reqs[e->n_reqs++] = r;
    return 0;
nomem:
    req_free(e, r);
    return RLB_ENOMEM;
}

/* Moves a finished request's samples into a result on the done queue. */
static int complete_request(rlb_engine *e, gen_req *r)
{
    rlb_gen_result *res = calloc(1, sizeof *res);
    if (!res || grow((void **)&e->done, &e->cap_done, e->n_done + 1, sizeof *e->done)) {
        free(res);
        return RLB_ENOMEM;
    }
    res->id = r->id;
    res->n = r->n;
    res->samples = calloc((size_t)r->n, sizeof *res->samples);
    if (!res->samples) {
        free(res);
        return RLB_ENOMEM;
    }
    for (int32_t j = 0; j < r->n; j++) {
        rlb_gen_sample *out = &res->samples[j];
        gen_seq *s = r->seqs[j];
        out->finish = s ? s->finish : RLB_FINISH_ABORT;
        if (!s || s->len == r->prompt_len)
            continue;
        /* The sequence's arrays are handed over: generated tokens moved to the front. */
        out->n_tokens = s->len - r->prompt_len;
        memmove(s->tokens, s->tokens + r->prompt_len, (size_t)out->n_tokens * sizeof(int32_t));
        out->tokens = s->tokens;
        s->tokens = NULL;
        if (r->logprobs) {
            memmove(s->logprobs, s->logprobs + r->prompt_len,
                    (size_t)out->n_tokens * sizeof(float));
            out->logprobs = s->logprobs;
            s->logprobs = NULL;
        }
    }
    e->done[e->n_done++] = res;
    int64_t idx;
    if (find_req(e, r->id, &idx)) {
        memmove(e->reqs + idx, e->reqs + idx + 1, (size_t)(e->n_reqs - idx - 1) * sizeof *e->reqs);
        e->n_reqs--;
    }
    req_free(e, r);
    return 0;
}

/* Marks sample s ended with `why` and gives its blocks back. Returns 1 when it was the
 * request's last live sample. */
static int retire_seq(rlb_engine *e, gen_seq *s, rlb_finish why)
{
    s->finish = why;
    rlb__kv_release(&e->kv, &s->blocks);
    if (!list_remove(&e->running, s))
        list_remove(&e->waiting, s);
    return --s->req->n_live == 0;
}

/* Ends sample s; the request completes with its last sample. */
static int finish_seq(rlb_engine *e, gen_seq *s, rlb_finish why)
{
    return retire_seq(e, s, why) ? complete_request(e, s->req) : 0;
}

/* Frees s's blocks and queues it at the front for recompute. */
static int preempt(rlb_engine *e, gen_seq *s)
{
    rlb__kv_release(&e->kv, &s->blocks);
    s->computed = 0;
    list_remove(&e->running, s);
    e->stats.preemptions++;
    return list_insert(&e->waiting, 0, s);
}

static int is_stop(const gen_req *r, int32_t tok)
{
    for (int32_t i = 0; i < r->n_stop; i++)
        if (r->stop_ids[i] == tok)
            return 1;
    return 0;
}

/* Queues the sampling of the token after s's known tokens from logits row `row`. */
static int add_job(rlb_engine *e, gen_seq *s, int64_t row)
{
    if (e->n_jobs == e->cap_jobs) {
        int64_t cap = e->cap_jobs ? 2 * e->cap_jobs : 16;
        void *a = realloc(e->jobs, (size_t)cap * sizeof *e->jobs);
        if (a)
            e->jobs = a;
        void *b = realloc(e->job_seq, (size_t)cap * sizeof *e->job_seq);
        if (b)
            e->job_seq = b;
        void *c = realloc(e->job_tok, (size_t)cap * sizeof *e->job_tok);
        if (c)
            e->job_tok = c;
        void *d = realloc(e->job_lp, (size_t)cap * sizeof *e->job_lp);
        if (d)
            e->job_lp = d;
        if (!a || !b || !c || !d)
            return RLB_ENOMEM;
        e->cap_jobs = cap;
    }
    e->jobs[e->n_jobs] = (rlb_sample_job){.row = row, .sp = s->req->sampling,
                                          .sample = (uint64_t)s->sample, .pos = s->len};
    e->job_seq[e->n_jobs++] = s;
    return 0;
}

/* Appends a sampled token to s, and ends s on a stop id or its length. */
static int append_token(rlb_engine *e, gen_seq *s, int32_t tok, float lp)
{
    gen_req *r = s->req;
    s->tokens[s->len] = tok;
    s->logprobs[s->len] = lp;
    s->len++;
    e->stats.sampled_tokens++;
    if (is_stop(r, tok))
        return finish_seq(e, s, RLB_FINISH_STOP);
    if (s->len - r->prompt_len >= r->max_tokens || s->len >= e->opts.max_model_len)
        return finish_seq(e, s, RLB_FINISH_LENGTH);
    return 0;
}

/* The prompt of sample 0 is done: start samples 1..n-1 on a shared copy of its cache (or,
 * when no block is free for the copy, queued for their own prefill), each drawing its
 * first token from the same logits row with its own sample index. */
static int fork_samples(rlb_engine *e, gen_seq *parent, int64_t row)
{
    gen_req *r = parent->req;
    int64_t front = 0;
    for (int32_t j = 1; j < r->n; j++) {
        gen_seq *c = seq_new(r, j);
        if (!c)
            return RLB_ENOMEM;
        r->seqs[j] = c;
        int rc = rlb__kv_fork(&e->kv, &c->blocks, &parent->blocks, r->prompt_len);
        if (rc == 0) {
            c->computed = r->prompt_len;
            e->stats.forks++;
            rc = list_insert(&e->running, e->running.n, c);
        } else if (rc == RLB_EAGAIN) {
            rc = list_insert(&e->waiting, front++, c);
        }
        if (rc || (rc = add_job(e, c, row)))
            return rc;
    }
    return 0;
}

static int add_span(rlb_engine *e, int64_t *n_spans, gen_seq *s, int64_t chunk)
{
    if (*n_spans == e->cap_spans) {
        int64_t cap = e->cap_spans ? 2 * e->cap_spans : 16;
        rlb_fwd_span *spans = realloc(e->spans, (size_t)cap * sizeof *spans);
        if (spans)
            e->spans = spans;
        gen_seq **seqs = realloc(e->span_seq, (size_t)cap * sizeof *seqs);
        if (seqs)
            e->span_seq = seqs;
        if (!spans || !seqs)
            return RLB_ENOMEM;
        e->cap_spans = cap;
    }
    e->spans[*n_spans] = (rlb_fwd_span){
        .tokens = s->tokens + s->computed,
        .n = chunk,
        .pos0 = s->computed,
        .blocks = &s->blocks,
        .logits = s->computed + chunk == s->len ? RLB_FWD_LOGITS_LAST : RLB_FWD_LOGITS_NONE,
    };
    e->span_seq[(*n_spans)++] = s;
    return 0;
}

/* Builds this step's spans. Returns their number or RLB_ENOMEM. */
static int64_t schedule(rlb_engine *e)
{
    int64_t budget = e->opts.max_batch_tokens, n_spans = 0;
    int rc;
    for (int64_t i = 0; i < e->running.n && budget > 0;) {
        gen_seq *s = e->running.items[i];
        int64_t chunk = s->len - s->computed < budget ? s->len - s->computed : budget;
        rc = rlb__kv_reserve(&e->kv, &s->blocks, s->computed + chunk);
        if (rc == RLB_EAGAIN) {
            /* The latest admitted running sequence (not scheduled yet: it sits at or
             * after i) gives its blocks back; s retries, or was the victim itself. */
            if ((rc = preempt(e, e->running.items[e->running.n - 1])))
                return rc;
            continue;
        }
        if (rc || (rc = add_span(e, &n_spans, s, chunk)))
            return rc;
        budget -= chunk;
        i++;
    }
    while (budget > 0 && e->waiting.n > 0 && e->running.n < e->opts.max_seqs) {
        gen_seq *s = e->waiting.items[0];
        int64_t chunk = s->len - s->computed < budget ? s->len - s->computed : budget;
        rc = rlb__kv_reserve(&e->kv, &s->blocks, s->computed + chunk);
        if (rc == RLB_EAGAIN)
            break; /* new work waits for blocks; it never preempts running work */
        if (rc)
            return rc;
        list_remove(&e->waiting, s);
        if ((rc = list_insert(&e->running, e->running.n, s)) ||
            (rc = add_span(e, &n_spans, s, chunk)))
            return rc;
        budget -= chunk;
    }
    return n_spans;
}

int rlb__engine_step(rlb_engine *e)
{
    if (e->failed)
        return RLB_EINVAL;
    if (e->asleep)
        return RLB_EAGAIN;
    int64_t n_spans = schedule(e);
    if (n_spans <= 0)
        return (int)n_spans;
    int rc = rlb__forward_step(&e->fwd, &e->kv, e->spans, n_spans);
    if (rc) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "forward pass failed: %s", rlb_strerror(rc));
        e->failed = 1;
        return rc;
    }
    e->stats.steps++;
    /* Which tokens to sample: forks first, so every sample of a request draws from the
     * logits of its prompt's last token, then each span's own sequence. */
    int64_t row = 0;
    e->n_jobs = 0;
    for (int64_t i = 0; i < n_spans && !rc; i++) {
        gen_seq *s = e->span_seq[i];
        s->computed += e->spans[i].n;
        if (e->spans[i].logits != RLB_FWD_LOGITS_LAST) {
            e->stats.prefill_tokens += (uint64_t)e->spans[i].n;
            continue;
        }
        e->stats.prefill_tokens += (uint64_t)e->spans[i].n - 1;
        gen_req *r = s->req;
        if (s->sample == 0 && r->n > 1 && !r->seqs[1])
            rc = fork_samples(e, s, row);
        if (!rc)
            rc = add_job(e, s, row++);
    }
    if (!rc)
        rc = rlb__forward_sample(&e->fwd, e->jobs, e->n_jobs, e->job_tok, e->job_lp);
    for (int64_t j = 0; j < e->n_jobs && !rc; j++)
        rc = append_token(e, e->job_seq[j], e->job_tok[j], e->job_lp[j]);
    if (rc) {
        e->failed = 1;
        return rc;
    }
    return (int)n_spans;
}

int rlb__engine_busy(const rlb_engine *e)
{
    return e->n_reqs > 0;
}

int rlb__engine_pop(rlb_engine *e, rlb_gen_result **out)
{
    if (e->n_done == 0)
        return RLB_EAGAIN;
    *out = e->done[0];
    memmove(e->done, e->done + 1, (size_t)(e->n_done - 1) * sizeof *e->done);
    e->n_done--;
    return 0;
}

int rlb__engine_abort(rlb_engine *e, uint64_t id)
{
    gen_req *r = find_req(e, id, NULL);
    if (!r)
        return RLB_ENOTFOUND;
    /* Samples that never forked end with no tokens (complete_request reports them). */
    for (int32_t j = 0; j < r->n; j++)
        if (!r->seqs[j])
            r->n_live--;
    for (int32_t j = 0; j < r->n; j++)
        if (r->seqs[j] && r->seqs[j]->finish == RLB_FINISH_NONE)
            retire_seq(e, r->seqs[j], RLB_FINISH_ABORT);
    return complete_request(e, r);
}

/* Preempts every running sequence, oldest ending up at the front of the queue. */
static int preempt_all(rlb_engine *e)
{
    while (e->running.n > 0) {
        int rc = preempt(e, e->running.items[e->running.n - 1]);
        if (rc)
            return rc;
    }
    return 0;
}

int rlb__engine_sleep(rlb_engine *e)
{
    if (e->asleep)
        return 0;
    int rc = preempt_all(e);
    if (rc || (rc = rlb__kv_sleep(&e->kv)))
        return rc;
    e->asleep = 1;
    return 0;
}

int rlb__engine_wake(rlb_engine *e)
{
    int rc = rlb__kv_wake(&e->kv);
    if (rc)
        return rc;
    e->asleep = 0;
    return 0;
}

int rlb__engine_reset(rlb_engine *e)
{
    for (int64_t i = 0; i < e->n_reqs; i++)
        req_free(e, e->reqs[i]);
    for (int64_t i = 0; i < e->n_done; i++)
        rlb__gen_result_free(e->done[i]);
    e->n_reqs = e->n_done = e->n_jobs = 0;
    e->waiting.n = e->running.n = 0;
    e->failed = 0;
    if (!e->asleep && e->kv.n_free != e->kv.n_blocks) {
        RLB_LOG_ERROR(RLB_SUB_ENGINE, "reset: %lld of %lld KV blocks free with no request "
                      "left", (long long)e->kv.n_free, (long long)e->kv.n_blocks);
        e->failed = 1;
        return RLB_EIO;
    }
    return 0;
}

int rlb__engine_reload(rlb_engine *e)
{
    int rc = preempt_all(e);
    return rc ? rc : rlb__forward_postload(&e->fwd);
}

int rlb__engine_set_weights(rlb_engine *e, const void *weights)
{
    if (!weights)
        return RLB_EINVAL;
    int rc = preempt_all(e);
    return rc ? rc : rlb__forward_set_weights(&e->fwd, weights);
}

void rlb__engine_stats(const rlb_engine *e, rlb_engine_stats *out)
{
    *out = e->stats;
    out->kv_blocks = e->kv.n_blocks;
    out->kv_free = e->kv.n_free;
}

rlb_forward *rlb__engine_forward(rlb_engine *e)
{
    return &e->fwd;
}
