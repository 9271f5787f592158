/* engine_util.h: what the engine tests share: the HF reference fixtures
 * (tests/fixtures/<name>/reference.json + logits.f32, made by make_fixtures.py) and a
 * runner that plays T tensor-parallel ranks as T processes over one shared-memory region.
 *
 * The runner keeps rank 0 in the calling process (so cmocka and the leak checker see it)
 * and forks ranks 1..T-1. Each rank writes what it computed into its own slice of a
 * MAP_SHARED output area, so the caller can check that every rank got the same answer.
 * A rank that fails or hangs cannot hang the test: collectives time out (TP_TIMEOUT_MS)
 * and the parent waits for its children with a deadline, killing them past it.
 */
#ifndef RLB_TESTS_ENGINE_UTIL_H
#define RLB_TESTS_ENGINE_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "worker/engine.h"
#include "common/tp_comm.h"

#define FX_MAX_PROMPTS 4
#define FX_MAX_IDS 64
#define TP_TIMEOUT_MS 20000 /* bound on one collective's wait in the tests */

typedef struct fx_prompt {
    int32_t ids[FX_MAX_IDS];    /* prompt token ids */
    int64_t n_ids;              /* prompt length */
    int32_t greedy[FX_MAX_IDS]; /* HF's greedy continuation */
    int64_t n_greedy;           /* its length (the fixture's greedy_steps) */
    const float *logits;        /* [logits_rows, vocab] HF logits of prompt + greedy */
    int64_t logits_rows;        /* n_ids + n_greedy */
} fx_prompt;

typedef struct fixture {
    char dir[1024];                    /* checkpoint directory */
    int64_t vocab;                     /* V */
    int n_prompts;                     /* entries in prompts[] */
    fx_prompt prompts[FX_MAX_PROMPTS]; /* the reference prompts */
    float *all_logits;                 /* logits.f32, every prompt's rows */
} fixture;

/* Reads tests/fixtures/<name>. Returns 0 or -1 (message on stderr). */
int fx_load(const char *name, fixture *fx);

/* HF's bfloat16 outputs on a GPU for a fixture (tests/fixtures/make_bf16_fixtures.py). */
typedef struct fx_bf16 {
    int32_t greedy[FX_MAX_PROMPTS][FX_MAX_IDS]; /* HF's bf16 greedy continuation */
    int64_t n_greedy[FX_MAX_PROMPTS];
    const float *logits[FX_MAX_PROMPTS]; /* HF's bf16 logits of the same rows as the fp32
                                          * fixture's (prompt + fp32 greedy) */
    double yardstick;  /* max |HF bf16 - HF fp32| logit: how far bf16 moves HF itself */
    float *all_logits; /* logits_bf16.f32; free() it */
} fx_bf16;

/* Reads fx's reference_bf16.json and logits_bf16.f32. Returns 0, 1 when the fixture has
 * none (not made yet), or -1 when they are malformed (message on stderr). */
int fx_load_bf16(const fixture *fx, fx_bf16 *b);
void fx_free(fixture *fx);
/* The fixture directory of `name` (static storage). */
const char *fx_dir(const char *name);

/* max |a - b| / max(1, max |ref|) over n values: the relative error the tests bound. */
double rel_err(const float *a, const float *ref, int64_t n);

/* Steps the engine until no request is unfinished. Returns 0 or the failing step's
 * error. */
int engine_run_all(rlb_engine *e);

/* One rank's work: writes its results to `out` (out_bytes, zeroed) and returns 0 on
 * success, anything else on failure. */
typedef int (*tp_rank_fn)(int rank, rlb_tp_comm *comm, void *arg, void *out);

/* Runs fn on ranks 0..T-1 (T == 1: the local communicator, no fork). On success *outs
 * points at T consecutive out areas of out_bytes each (free with tp_outs_free). Returns
 * 0 when every rank returned 0 and exited cleanly, -1 otherwise. */
int tp_run(int T, tp_rank_fn fn, void *arg, size_t out_bytes, void **outs);
void tp_outs_free(void *outs, int T, size_t out_bytes);
/* Rank r's out area in what tp_run returned. */
void *tp_out(void *outs, int r, size_t out_bytes);

#endif /* RLB_TESTS_ENGINE_UTIL_H */
