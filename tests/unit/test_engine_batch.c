/* test_engine_batch: the engine's output depends on nothing but each request.
 *
 * One set of requests (llama_gqa fixture; prompts of 3 to 21 tokens; greedy, temperature,
 * top-k and top-p sampling; n = 1 to 3 samples) is generated in several ways, and every
 * way must give the same tokens, and logprobs within LOGPROB_TOL (the matrix products
 * round differently for other batch shapes and TP splits), as each request run alone in
 * a fresh engine with a roomy cache, the reference:
 *   together   all requests in one engine, 16 tokens per step (chunked prefill, forks)
 *   pressure   all requests, a cache of PRESSURE_BLOCKS 4-token blocks where one request
 *              alone fits but not all: sequences wait, are preempted and recomputed
 *              (the test checks preemptions happened)
 *   sleep      all requests, put to sleep after a few steps (step then says RLB_EAGAIN),
 *              woken, run to the end
 *   tp2, tp4   all requests at TP 2 / TP 4, ranks in processes over shared memory, every
 *              rank the same bytes
 * plus stop ids (a sample stops at the first stop id, which it keeps), abort (tokens so
 * far, a prefix of the reference), the refusals of rlb__engine_add, and switching to
 * another weight buffer (rlb__engine_set_weights, fp32 and int8).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "rlb/rlb.h"
#include "tests/unit/engine_util.h"
#include "worker/engine.h"
#include "worker/loader.h"

#define N_REQ 6
#define MAX_N 3
#define MAX_TOK 24
#define PRESSURE_BLOCKS 14  /* 4-token blocks: the longest request (45 tokens) needs 12 */
#define LOGPROB_TOL 1e-5    /* relative to max(1, |logprob|): batch shape and TP change
                             * the rounding of the matrix products, not the tokens */
#define SLEEP_AFTER 5       /* steps before the sleep scenario sleeps */

typedef enum scenario { ALONE, TOGETHER, PRESSURE, SLEEP } scenario;

typedef struct sample_out {
    int32_t tokens[MAX_TOK]; /* generated ids */
    float logprobs[MAX_TOK]; /* their logprobs */
    int64_t n_tokens;        /* how many */
    int32_t finish;          /* rlb_finish */
} sample_out;

typedef struct batch_out {
    sample_out s[N_REQ][MAX_N]; /* by request id and sample index */
    int32_t n[N_REQ];           /* samples each result had */
    uint64_t preemptions;       /* the engine's counter */
    int32_t asleep_rc;          /* what a step returned while asleep */
} batch_out;

typedef struct batch_arg {
    scenario how; /* how to run */
    int tp;       /* T */
} batch_arg;

static int32_t prompts[N_REQ][24];
static const int64_t prompt_len[N_REQ] = {3, 21, 9, 14, 5, 11};
static const int32_t n_samples[N_REQ] = {1, 2, 1, 3, 2, 1};
static const int32_t max_tokens[N_REQ] = {24, 20, 16, 24, 12, 18};
static const rlb_sampling sampling[N_REQ] = {
    {.temperature = 0.0f, .top_p = 1.0f},
    {.temperature = 0.8f, .top_k = 20, .top_p = 1.0f, .seed = 11},
    {.temperature = 1.0f, .top_p = 0.9f, .seed = 12},
    {.temperature = 1.2f, .top_k = 50, .top_p = 0.8f, .seed = 13},
    {.temperature = 1.0f, .top_p = 1.0f, .seed = 14},
    {.temperature = 0.6f, .top_k = 5, .top_p = 0.95f, .seed = 15},
};
static fixture fx;

static rlb_gen_request request(int i)
{
    return (rlb_gen_request){.id = 100 + (uint64_t)i, .prompt = prompts[i],
                             .prompt_len = prompt_len[i], .n = n_samples[i],
                             .max_tokens = max_tokens[i], .sampling = sampling[i],
                             .logprobs = 1};
}

static void store_result(const rlb_gen_result *r, batch_out *out)
{
    int i = (int)(r->id - 100);
    out->n[i] = r->n;
    for (int j = 0; j < r->n && j < MAX_N; j++) {
        sample_out *o = &out->s[i][j];
        o->n_tokens = r->samples[j].n_tokens;
        o->finish = r->samples[j].finish;
        memcpy(o->tokens, r->samples[j].tokens, (size_t)o->n_tokens * sizeof(int32_t));
        memcpy(o->logprobs, r->samples[j].logprobs, (size_t)o->n_tokens * sizeof(float));
    }
}

static int drain(rlb_engine *e, batch_out *out)
{
    int rc = engine_run_all(e);
    if (rc)
        return rc;
    rlb_gen_result *r;
    while (rlb__engine_pop(e, &r) == 0) {
        store_result(r, out);
        rlb__gen_result_free(r);
    }
    return 0;
}

static int make_engine(const rlb_loaded *m, const void *weights, rlb_tp_comm *comm,
                       scenario how, rlb_quant quant, rlb_engine **e)
{
    rlb_engine_opts o = RLB_ENGINE_OPTS_INIT;
    o.block_tokens = 4;
    o.kv_bytes = rlb__kv_block_bytes(m->layout.cfg.n_layers, m->layout.kvt,
                                     m->layout.cfg.head_dim, 4) *
                 (how == PRESSURE ? PRESSURE_BLOCKS : 256);
    o.max_batch_tokens = 16;
    o.threads = 1;
    o.quant = quant;
    return rlb__engine_create(&m->layout, weights, comm, &o, e);
}

static int run_scenario(const batch_arg *a, const rlb_loaded *m, rlb_tp_comm *comm,
                        batch_out *out)
{
    rlb_engine *e = NULL;
    int rc = 0;
    if (a->how == ALONE) {
        for (int i = 0; i < N_REQ && !rc; i++) {
            rlb_gen_request q = request(i);
            if (!(rc = make_engine(m, m->weights, comm, ALONE, RLB_QUANT_NONE, &e)) && !(rc = rlb__engine_add(e, &q)))
                rc = drain(e, out);
            rlb__engine_destroy(e);
            e = NULL;
        }
        return rc;
    }
    if ((rc = make_engine(m, m->weights, comm, a->how, RLB_QUANT_NONE, &e)))
        return rc;
    for (int i = 0; i < N_REQ && !rc; i++) {
        rlb_gen_request q = request(i);
        rc = rlb__engine_add(e, &q);
    }
    for (int s = 0; a->how == SLEEP && s < SLEEP_AFTER && !rc; s++)
        rc = rlb__engine_step(e) < 0;
    if (a->how == SLEEP && !rc && !(rc = rlb__engine_sleep(e))) {
        out->asleep_rc = rlb__engine_step(e);
        rc = rlb__engine_wake(e);
    }
    if (!rc)
        rc = drain(e, out);
    rlb_engine_stats st;
    rlb__engine_stats(e, &st);
    out->preemptions = st.preemptions;
    rlb__engine_destroy(e);
    return rc;
}

static int batch_rank(int rank, rlb_tp_comm *comm, void *argp, void *outp)
{
    const batch_arg *a = argp;
    char err[512];
    rlb_loaded m;
    int rc = rlb__load_checkpoint(fx.dir, a->tp, rank, &m, err, sizeof err);
    if (rc) {
        fprintf(stderr, "rank %d: %s\n", rank, err);
        return rc;
    }
    rc = run_scenario(a, &m, comm, outp);
    if (rc)
        fprintf(stderr, "rank %d scenario %d: %s\n", rank, (int)a->how, rlb_strerror(rc));
    rlb__loaded_free(&m);
    return rc;
}

static batch_out *reference;

static int setup(void **state)
{
    (void)state;
    if (fx_load("llama_gqa", &fx))
        return -1;
    uint64_t x = 2024;
    for (int i = 0; i < N_REQ; i++)
        for (int k = 0; k < prompt_len[i]; k++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            prompts[i][k] = (int32_t)((x >> 33) % (uint64_t)fx.vocab);
        }
    batch_arg a = {.how = ALONE, .tp = 1};
    void *outs;
    if (tp_run(1, batch_rank, &a, sizeof(batch_out), &outs))
        return -1;
    reference = outs;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    tp_outs_free(reference, 1, sizeof(batch_out));
    fx_free(&fx);
    return 0;
}

static void assert_same(const batch_out *got, const batch_out *ref, const char *what)
{
    double worst = 0.0;
    for (int i = 0; i < N_REQ; i++) {
        assert_int_equal(got->n[i], n_samples[i]);
        for (int j = 0; j < n_samples[i]; j++) {
            const sample_out *g = &got->s[i][j], *r = &ref->s[i][j];
            assert_int_equal(g->n_tokens, r->n_tokens);
            assert_int_equal(g->finish, r->finish);
            assert_memory_equal(g->tokens, r->tokens, (size_t)r->n_tokens * sizeof(int32_t));
            for (int64_t k = 0; k < r->n_tokens; k++) {
                double d = fabs(g->logprobs[k] - r->logprobs[k]) /
                           fmax(1.0, fabs(r->logprobs[k]));
                worst = d > worst ? d : worst;
            }
        }
    }
    printf("%s: worst logprob difference (relative) %.3g (bound %.0e)\n", what, worst, LOGPROB_TOL);
    assert_true(worst <= LOGPROB_TOL);
}

static void test_reference_sane(void **state)
{
    (void)state;
    const batch_out *r = reference;
    for (int i = 0; i < N_REQ; i++) {
        assert_int_equal(r->n[i], n_samples[i]);
        for (int j = 0; j < n_samples[i]; j++) {
            assert_int_equal(r->s[i][j].n_tokens, max_tokens[i]);
            assert_int_equal(r->s[i][j].finish, RLB_FINISH_LENGTH);
            for (int k = 0; k < max_tokens[i]; k++) {
                assert_true(r->s[i][j].tokens[k] >= 0 && r->s[i][j].tokens[k] < fx.vocab);
                assert_true(r->s[i][j].logprobs[k] <= 0.0f);
            }
        }
        /* Samples of one request draw their own noise. */
        if (n_samples[i] > 1)
            assert_memory_not_equal(r->s[i][0].tokens, r->s[i][1].tokens,
                                    (size_t)max_tokens[i] * sizeof(int32_t));
    }
}

/* A way of running the requests, as a cmocka test state. */
typedef struct scenario_case {
    const char *name; /* printed with the error figure */
    batch_arg arg;    /* how and at what TP */
} scenario_case;

static void test_scenario(void **state)
{
    const scenario_case *c = *state;
    int tp = c->arg.tp;
    scenario how = c->arg.how;
    batch_arg a = c->arg;
    void *outs;
    assert_int_equal(tp_run(tp, batch_rank, &a, sizeof(batch_out), &outs), 0);
    const batch_out *o = outs;
    assert_same(o, reference, c->name);
    for (int r = 1; r < tp; r++)
        assert_memory_equal(tp_out(outs, r, sizeof *o), o, sizeof *o);
    if (how == PRESSURE)
        assert_true(o->preemptions > 0);
    if (how == SLEEP)
        assert_int_equal(o->asleep_rc, RLB_EAGAIN);
    tp_outs_free(outs, tp, sizeof(batch_out));
}

/* A T = 1 engine over the fixture for the single-process tests below. */
typedef struct local_engine {
    rlb_loaded m;       /* weights */
    rlb_tp_comm *comm;  /* local communicator */
    rlb_engine *e;      /* the engine */
} local_engine;

static void local_open(local_engine *le, scenario how, rlb_quant quant)
{
    char err[512];
    assert_int_equal(rlb__load_checkpoint(fx.dir, 1, 0, &le->m, err, sizeof err), 0);
    assert_int_equal(rlb__tp_comm_local(&le->comm), 0);
    assert_int_equal(make_engine(&le->m, le->m.weights, le->comm, how, quant, &le->e), 0);
}

static void local_close(local_engine *le)
{
    rlb__engine_destroy(le->e);
    rlb__tp_comm_destroy(le->comm);
    rlb__loaded_free(&le->m);
}

static void test_stop_ids(void **state)
{
    (void)state;
    local_engine le;
    local_open(&le, TOGETHER, RLB_QUANT_NONE);
    /* Request 3's samples: stop at sample 1's fifth token. */
    const sample_out *ref = reference->s[3];
    int32_t stop = ref[1].tokens[4];
    rlb_gen_request q = request(3);
    q.stop_ids = &stop;
    q.n_stop = 1;
    assert_int_equal(rlb__engine_add(le.e, &q), 0);
    batch_out *out = calloc(1, sizeof *out);
    assert_int_equal(drain(le.e, out), 0);
    for (int j = 0; j < n_samples[3]; j++) {
        int64_t first = -1;
        for (int64_t k = 0; k < ref[j].n_tokens && first < 0; k++)
            if (ref[j].tokens[k] == stop)
                first = k;
        const sample_out *g = &out->s[3][j];
        int64_t want = first < 0 ? ref[j].n_tokens : first + 1;
        assert_int_equal(g->n_tokens, want);
        assert_int_equal(g->finish, first < 0 ? RLB_FINISH_LENGTH : RLB_FINISH_STOP);
        assert_memory_equal(g->tokens, ref[j].tokens, (size_t)want * sizeof(int32_t));
    }
    free(out);
    local_close(&le);
}

static void test_abort(void **state)
{
    (void)state;
    local_engine le;
    local_open(&le, TOGETHER, RLB_QUANT_NONE);
    rlb_gen_request q0 = request(0), q1 = request(1);
    assert_int_equal(rlb__engine_add(le.e, &q0), 0);
    assert_int_equal(rlb__engine_add(le.e, &q1), 0);
    for (int s = 0; s < 6; s++)
        assert_true(rlb__engine_step(le.e) > 0);
    assert_int_equal(rlb__engine_abort(le.e, q1.id), 0);
    assert_int_equal(rlb__engine_abort(le.e, q1.id), RLB_ENOTFOUND);
    rlb_gen_result *r;
    assert_int_equal(rlb__engine_pop(le.e, &r), 0);
    assert_true(r->id == q1.id);
    for (int j = 0; j < r->n; j++) {
        const rlb_gen_sample *s = &r->samples[j];
        assert_int_equal(s->finish, RLB_FINISH_ABORT);
        assert_true(s->n_tokens < max_tokens[1]);
        assert_memory_equal(s->tokens, reference->s[1][j].tokens,
                            (size_t)s->n_tokens * sizeof(int32_t));
    }
    rlb__gen_result_free(r);
    assert_int_equal(rlb__engine_pop(le.e, &r), RLB_EAGAIN);
    batch_out *out = calloc(1, sizeof *out);
    assert_int_equal(drain(le.e, out), 0);
    assert_memory_equal(out->s[0][0].tokens, reference->s[0][0].tokens,
                        (size_t)max_tokens[0] * sizeof(int32_t));
    free(out);
    local_close(&le);
}

static void test_add_refusals(void **state)
{
    (void)state;
    local_engine le;
    local_open(&le, PRESSURE, RLB_QUANT_NONE);
    rlb_gen_request q = request(2);
    int32_t bad_ids[3] = {1, (int32_t)fx.vocab, 2};
    q.prompt = bad_ids;
    q.prompt_len = 3;
    assert_int_equal(rlb__engine_add(le.e, &q), RLB_EINVAL);
    bad_ids[1] = -1;
    assert_int_equal(rlb__engine_add(le.e, &q), RLB_EINVAL);
    q = request(2);
    q.n = 0;
    assert_int_equal(rlb__engine_add(le.e, &q), RLB_EINVAL);
    q = request(2);
    q.max_tokens = 0;
    assert_int_equal(rlb__engine_add(le.e, &q), RLB_EINVAL);
    q = request(2);
    q.sampling.top_p = 0.0f;
    assert_int_equal(rlb__engine_add(le.e, &q), RLB_EINVAL);
    q = request(2);
    q.n_stop = 1;
    assert_int_equal(rlb__engine_add(le.e, &q), RLB_EINVAL); /* stop_ids NULL */
    /* One sample of 21 + 40 tokens needs 16 blocks; the cache has PRESSURE_BLOCKS. */
    q = request(1);
    q.max_tokens = 40;
    assert_int_equal(rlb__engine_add(le.e, &q), RLB_ETOOBIG);
    int32_t long_prompt[256] = {0};
    q.prompt = long_prompt;
    q.prompt_len = 256; /* max_position_embeddings */
    q.max_tokens = 1;
    assert_int_equal(rlb__engine_add(le.e, &q), RLB_ETOOBIG);
    q = request(2);
    assert_int_equal(rlb__engine_add(le.e, &q), 0);
    assert_int_equal(rlb__engine_add(le.e, &q), RLB_EEXIST);
    local_close(&le);
}

static void add_all(rlb_engine *e)
{
    for (int i = 0; i < N_REQ; i++) {
        rlb_gen_request q = request(i);
        assert_int_equal(rlb__engine_add(e, &q), 0);
    }
}

/* Staged weight sync: an engine switched to buffer B mid-generation finishes its requests
 * from B (the old buffer A is overwritten with NaNs right after the switch, so any read of
 * it would fail the step), and then generates exactly what a fresh engine over B does. */
static void check_set_weights(rlb_quant quant)
{
    local_engine le;
    local_open(&le, TOGETHER, quant);
    uint64_t bytes = le.m.layout.total_bytes;
    float *b;
    assert_int_equal(posix_memalign((void **)&b, 64, bytes), 0);
    memcpy(b, le.m.weights, bytes);
    /* B differs from A: its LM head is halved, which flattens every distribution. */
    const rlb_local_tensor *head = rlb__tp_layout_find(&le.m.layout, RLB_W_LM_HEAD, -1);
    assert_non_null(head);
    for (uint64_t i = 0; i < head->bytes / sizeof(float); i++)
        b[head->offset / sizeof(float) + i] *= 0.5f;

    batch_out *want = calloc(1, sizeof *want), *got = calloc(1, sizeof *got);
    rlb_engine *fresh;
    assert_int_equal(make_engine(&le.m, b, le.comm, TOGETHER, quant, &fresh), 0);
    add_all(fresh);
    assert_int_equal(drain(fresh, want), 0);
    rlb__engine_destroy(fresh);
    int differ = 0;
    for (int i = 0; i < N_REQ; i++)
        differ += memcmp(want->s[i][0].tokens, reference->s[i][0].tokens,
                         sizeof want->s[i][0].tokens) != 0;
    assert_true(differ > 0);

    add_all(le.e);
    for (int s = 0; s < 4; s++)
        assert_true(rlb__engine_step(le.e) > 0);
    assert_int_equal(rlb__engine_set_weights(le.e, NULL), RLB_EINVAL);
    assert_int_equal(rlb__engine_set_weights(le.e, b), 0);
    float nan = NAN;
    for (uint64_t i = 0; i < bytes / sizeof(float); i++)
        memcpy((float *)le.m.weights + i, &nan, sizeof nan);
    assert_int_equal(drain(le.e, got), 0);
    for (int i = 0; i < N_REQ; i++)
        for (int j = 0; j < n_samples[i]; j++)
            assert_int_equal(got->s[i][j].n_tokens, max_tokens[i]);
    memset(got, 0, sizeof *got);
    add_all(le.e);
    assert_int_equal(drain(le.e, got), 0);
    assert_same(got, want, quant == RLB_QUANT_INT8 ? "set_weights int8" : "set_weights");
    free(want);
    free(got);
    local_close(&le);
    free(b);
}

static void test_set_weights(void **state)
{
    (void)state;
    check_set_weights(RLB_QUANT_NONE);
    check_set_weights(RLB_QUANT_INT8);
}

/* A failed step, then rlb__engine_reset: the weights turn NaN mid-generation, so a step
 * fails (no finite logit) and the engine refuses to step; reset drops every request and
 * hands the whole KV pool back, and, the weights restored, the same engine generates
 * exactly the reference (no state of the failed batch survives). */
static void test_reset_after_failure(void **state)
{
    (void)state;
    local_engine le;
    local_open(&le, TOGETHER, RLB_QUANT_NONE);
    uint64_t bytes = le.m.layout.total_bytes;
    float *keep = malloc(bytes);
    assert_non_null(keep);
    memcpy(keep, le.m.weights, bytes);
    add_all(le.e);
    for (int s = 0; s < 3; s++)
        assert_true(rlb__engine_step(le.e) > 0);
    float nan = NAN;
    for (uint64_t i = 0; i < bytes / sizeof(float); i++)
        memcpy((float *)le.m.weights + i, &nan, sizeof nan);
    int rc = 0;
    for (int s = 0; s < 8 && rc >= 0; s++)
        rc = rlb__engine_step(le.e);
    assert_true(rc < 0);
    assert_true(rlb__engine_step(le.e) < 0); /* a failed engine refuses to step */
    memcpy(le.m.weights, keep, bytes);
    assert_int_equal(rlb__engine_reset(le.e), 0);
    rlb_engine_stats st;
    rlb__engine_stats(le.e, &st);
    assert_int_equal(st.kv_free, st.kv_blocks);
    rlb_gen_result *r;
    assert_int_equal(rlb__engine_pop(le.e, &r), RLB_EAGAIN); /* nothing of the batch left */
    batch_out *got = calloc(1, sizeof *got);
    assert_non_null(got);
    add_all(le.e);
    assert_int_equal(drain(le.e, got), 0);
    assert_same(got, reference, "after a reset");
    free(got);
    free(keep);
    local_close(&le);
}

int main(void)
{
    static scenario_case cases[] = {
        {"together", {TOGETHER, 1}}, {"pressure", {PRESSURE, 1}}, {"sleep_wake", {SLEEP, 1}},
        {"tp2", {TOGETHER, 2}},      {"tp4_pressure", {PRESSURE, 4}},
    };
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference_sane),
        cmocka_unit_test_prestate(test_scenario, &cases[0]),
        cmocka_unit_test_prestate(test_scenario, &cases[1]),
        cmocka_unit_test_prestate(test_scenario, &cases[2]),
        cmocka_unit_test_prestate(test_scenario, &cases[3]),
        cmocka_unit_test_prestate(test_scenario, &cases[4]),
        cmocka_unit_test(test_stop_ids),
        cmocka_unit_test(test_abort),
        cmocka_unit_test(test_add_refusals),
        cmocka_unit_test(test_set_weights),
        cmocka_unit_test(test_reset_after_failure),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
