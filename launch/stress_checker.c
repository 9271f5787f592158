/* stress_checker.c: `rlb stress --role checker`, the proof that no worker serves a torn
 * version.
 *
 * How the workers' buffers are checked (decided for `rlb stress`): not by reading them,
 * which would need a debug path through the bridge, but by what they compute. The checker
 * holds a reference engine in this process (the CPU engine at TP 1, worker/engine.h) whose
 * buffer it fills with the weights of any version from (seed, version) alone, the same
 * function the trainers publish from. After each commit of v it sends 2 x replicas greedy
 * probes with min_weight_version v at once (the bridge spreads them over the least-loaded
 * replicas) asking for the logprob of every token; for each sample it runs the reference of
 * the version stamped on it and compares token by token. The logprob of the sampled token
 * is a fingerprint of every weight the forward pass touched: a buffer holding any other
 * bytes than that version's (a mix of two versions, a stale or half-written buffer) moves it
 * far beyond the tolerance. Equal weights may still round differently (batch shape, TP
 * split); a token that differs where the reference's and the worker's logprobs agree within
 * the tolerance is a near tie, counted, not a violation.
 */
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/tp_comm.h"
#include "launch/stress.h"
#include "worker/engine.h"

#define PROBE_PROMPTS 4
#define PROBE_LEN 4
#define PROBE_TOKENS 8
#define PROBE_DEADLINE_MS 30000
#define REF_CACHE 16       /* versions whose reference is kept */
#define LOGPROB_TOL 2e-3   /* |worker - reference| allowed for the same weights */

static const int32_t probe_prompts[PROBE_PROMPTS][PROBE_LEN] = {
    {2, 7, 18, 28}, {100, 3, 249, 5}, {42, 42, 42, 42}, {17, 200, 31, 9}};

typedef struct reference {
    uint64_t version;                             /* 0: empty slot */
    int32_t tokens[PROBE_PROMPTS][PROBE_TOKENS];  /* greedy tokens */
    float logprobs[PROBE_PROMPTS][PROBE_TOKENS];  /* their logprobs */
} reference;

typedef struct checker {
    uint64_t seed;
    rlb_tp_layout layout;  /* TP 1, float32 */
    float *weights;        /* the reference engine's buffer */
    rlb_tp_comm *comm;     /* TP 1 */
    rlb_engine *engine;
    reference cache[REF_CACHE];
    uint32_t next_slot;    /* round robin over cache */
} checker;

static int checker_open(checker *k, uint64_t seed)
{
    memset(k, 0, sizeof(*k));
    k->seed = seed;
    const rlb_param_list *l = rlb__stress_params();
    int rc = rlb__tp_layout_init(&k->layout, &l->cfg, 1, 0, RLB_DTYPE_F32);
    if (rc < 0 || posix_memalign((void **)&k->weights, 64, k->layout.total_bytes) != 0)
        return rc < 0 ? rc : RLB_ENOMEM;
    memset(k->weights, 0, k->layout.total_bytes);
    if ((rc = rlb__tp_comm_local(&k->comm)) < 0)
        return rc;
    rlb_engine_opts eo = RLB_ENGINE_OPTS_INIT;
    eo.kv_bytes = 4u << 20;
    eo.threads = 1;
    return rlb__engine_create(&k->layout, k->weights, k->comm, &eo, &k->engine);
}

static void checker_close(checker *k)
{
    rlb__engine_destroy(k->engine);
    rlb__tp_comm_destroy(k->comm);
    free(k->weights);
    rlb__tp_layout_free(&k->layout);
}

/* The reference of version v, computed on first use. NULL when the engine failed. */
static const reference *reference_of(checker *k, uint64_t v)
{
    for (int i = 0; i < REF_CACHE; i++)
        if (k->cache[i].version == v)
            return &k->cache[i];
    reference *r = &k->cache[k->next_slot++ % REF_CACHE];
    r->version = 0;
    rlb__stress_tp_fill(&k->layout, k->seed, v, k->weights);
    if (rlb__engine_reload(k->engine) < 0)
        return NULL;
    for (int p = 0; p < PROBE_PROMPTS; p++) {
        rlb_gen_request q = {.id = (uint64_t)p + 1, .prompt = probe_prompts[p],
                             .prompt_len = PROBE_LEN, .n = 1, .max_tokens = PROBE_TOKENS,
                             .logprobs = 1};
        q.sampling.temperature = 0;
        q.sampling.top_p = 1.0f;
        if (rlb__engine_add(k->engine, &q) < 0)
            return NULL;
    }
    while (rlb__engine_busy(k->engine))
        if (rlb__engine_step(k->engine) < 0)
            return NULL;
    rlb_gen_result *res;
    while (rlb__engine_pop(k->engine, &res) == 0) {
        int p = (int)res->id - 1;
        const rlb_gen_sample *s = &res->samples[0];
        for (int i = 0; i < PROBE_TOKENS; i++) {
            r->tokens[p][i] = i < s->n_tokens ? s->tokens[i] : -1;
            r->logprobs[p][i] = i < s->n_tokens ? s->logprobs[i] : NAN;
        }
        rlb__gen_result_free(res);
    }
    r->version = v;
    return r;
}

static int close_enough(float a, float b)
{
    return fabsf(a - b) <= LOGPROB_TOL * (1.0f + fabsf(b));
}

/* Compares one served sample with the reference of its version. */
static int verdict(const reference *r, int p, const rlb_sample *s, char *why, size_t cap)
{
    if (s->n_tokens != PROBE_TOKENS || !s->logprobs) {
        snprintf(why, cap, "probe %d: %u tokens, want %d with logprobs", p, s->n_tokens,
                 PROBE_TOKENS);
        return RLB_PROBE_MISMATCH;
    }
    for (int i = 0; i < PROBE_TOKENS; i++) {
        int same = s->tokens[i] == r->tokens[p][i];
        if (!close_enough(s->logprobs[i], r->logprobs[p][i])) {
            snprintf(why, cap, "probe %d token %d: worker %d (logprob %.6f), reference of "
                     "version %llu %d (%.6f)", p, i, s->tokens[i], s->logprobs[i],
                     (unsigned long long)r->version, r->tokens[p][i], r->logprobs[p][i]);
            return RLB_PROBE_MISMATCH;
        }
        if (!same)
            return RLB_PROBE_NEAR_TIE; /* the continuations differ from here on */
    }
    return RLB_PROBE_OK;
}

/* Sends the probes for committed version v and reports each. Returns 0 or RLB_EPEERDEAD. */
static int probe(checker *k, rlb_client *c, uint64_t v, uint32_t n_probes)
{
    rlb_ticket t[64];
    rlb_prompt prompt[64];
    rlb_sampling_params sp;
    rlb_sampling_params_init(&sp);
    sp.temperature = 0;
    sp.max_tokens = PROBE_TOKENS;
    sp.logprobs = 0;
    double t0 = rlb__clock_ms_f();
    int dead = 0;
    for (uint32_t i = 0; i < n_probes; i++) {
        prompt[i] = (rlb_prompt){probe_prompts[i % PROBE_PROMPTS], PROBE_LEN};
        rlb_generate_request req;
        rlb_generate_request_init(&req);
        req.prompts = &prompt[i];
        req.n_prompts = 1;
        req.sampling = &sp;
        req.min_weight_version = v;
        int rc = rlb_generate_submit(c, &req, &t[i]);
        if (rc < 0) {
            t[i] = 0;
            rlb_stress_rec rec = {.kind = RLB_REC_PROBE, .rc = rc, .version = v};
            snprintf(rec.text, sizeof(rec.text), "%s", rlb_last_error(c));
            rlb__stress_send(&rec);
            dead |= rc == RLB_EPEERDEAD;
        }
    }
    for (uint32_t i = 0; i < n_probes; i++) {
        if (!t[i])
            continue;
        rlb_result *res = NULL;
        double left = PROBE_DEADLINE_MS - (rlb__clock_ms_f() - t0);
        int rc = rlb_generate_wait(c, t[i], left > 0 ? (int)left : 0, &res);
        rlb_stress_rec rec = {.kind = RLB_REC_PROBE, .rc = rc, .version = v,
                              .ms = rlb__clock_ms_f() - t0};
        if (rc == 0) {
            const rlb_sample *s = rlb_result_sample(res, 0);
            const reference *r = s ? reference_of(k, s->weight_version) : NULL;
            rec.vmin = rec.vmax = s ? s->weight_version : 0;
            rec.count = r ? (uint32_t)verdict(r, (int)(i % PROBE_PROMPTS), s, rec.text,
                                              sizeof(rec.text))
                          : RLB_PROBE_MISMATCH;
            if (!r)
                snprintf(rec.text, sizeof(rec.text), "no sample, or the reference failed");
        } else {
            snprintf(rec.text, sizeof(rec.text), "%s", rlb_last_error(c));
            dead |= rc == RLB_EPEERDEAD;
        }
        rlb_result_free(res);
        rlb__stress_send(&rec);
    }
    return dead ? RLB_EPEERDEAD : 0;
}

int rlb__stress_checker(int argc, char **argv)
{
    rlb_stress_role_opts ro;
    if (rlb__stress_role_parse(argc, argv, &ro))
        return 2;
    static checker k;
    int rc = checker_open(&k, ro.seed);
    if (rc < 0) {
        fprintf(stderr, "stress checker: reference engine: %s\n", rlb_strerror(rc));
        return 1;
    }
    uint32_t n_probes = 2 * ro.replicas > 64 ? 64 : 2 * ro.replicas;
    rlb_client_options o;
    rlb__stress_tool_options(&o, ro.socket);
    rlb_client *cl = NULL;
    while (!rlb__stress_stopping()) {
        /* Only the newest commit matters: older ones queued meanwhile are skipped. */
        uint64_t v = 0;
        rlb_stress_cmd cmd;
        struct pollfd pf = {.fd = RLB_STRESS_CMD_FD, .events = POLLIN};
        while (poll(&pf, 1, v ? 0 : 200) == 1) {
            if (read(RLB_STRESS_CMD_FD, &cmd, sizeof(cmd)) != (ssize_t)sizeof(cmd)) {
                goto out; /* the supervisor is gone */
            }
            v = cmd.version > v ? cmd.version : v;
        }
        if (!v)
            continue;
        if (!cl && rlb_connect(&o, &cl) < 0) {
            cl = NULL;
            continue; /* the bridge restarts; the next commit is probed */
        }
        if (probe(&k, cl, v, n_probes) == RLB_EPEERDEAD) {
            rlb_close(cl);
            cl = NULL;
        }
    }
out:
    rlb_close(cl);
    checker_close(&k);
    return 0;
}
