/* sample.h: token sampling with vLLM's semantics and batch-independent randomness.
 *
 * Given one row of logits over the full vocabulary V:
 *   greedy (temperature <= RLB_SAMPLE_GREEDY_EPS): the first index of the largest logit;
 *     its logprob is log_softmax(logits)[token].
 *   otherwise z = logits / temperature (float32), then
 *     top_k (0 < k < V): keep the tokens whose z is >= the k-th largest z (ties kept);
 *     top_p (< 1): over the tokens still kept, p = softmax(z); keep a token when the mass
 *       of the kept tokens ranked above it (z descending, then id ascending) is < top_p,
 *       which is vLLM's "ascending cumsum > 1 - p" (the most likely token always stays);
 *     then the token is argmax over the kept set of exp(z - max z) / E, E = -log(u):
 *     the exponential race, i.e. Gumbel-max (argmax z - log(-log u)) evaluated in the
 *     probability domain. u in (0, 1) comes from a counter-based hash of (seed, sample
 *     index, position, token id), so a sample depends on nothing but its own request:
 *     not on batch composition, thread count or TP layout.
 *     Its logprob is log_softmax(z)[token] over the full vocabulary, before top-k/top-p:
 *     what the trainer recomputes.
 * Logsumexps accumulate in double.
 *
 * Non-finite logits (poisoned weights, an overflow) are defined, never fatal:
 *   NaN counts as -inf: the token is never sampled and adds no mass;
 *   +inf (after the division by the temperature): the +inf tokens are the limit of the
 *     softmax, so they share all the mass equally (greedy: the first of them; logprob
 *     -log(count)) and every other token has none;
 *   no token left (every logit NaN or -inf): RLB_ENONFINITE, which the engine reports for
 *     the request; the caller's other requests are not concerned.
 */
#ifndef RLB_KERNELS_CPU_SAMPLE_H
#define RLB_KERNELS_CPU_SAMPLE_H

#include <stdint.h>

#include "rlb/rlb.h"

#define RLB_SAMPLE_GREEDY_EPS 1e-5f /* vLLM's _SAMPLING_EPS: at or below it, greedy */

typedef struct rlb_sampling {
    float temperature; /* <= RLB_SAMPLE_GREEDY_EPS: greedy */
    int32_t top_k;     /* <= 0 or >= V: no top-k */
    float top_p;       /* (0, 1]; 1: no top-p */
    uint64_t seed;     /* key of the noise, with the sample index, position and token */
} rlb_sampling;

/* Scratch reused across calls, grown to the vocabulary on first use. */
typedef struct rlb_sample_ws {
    int64_t cap;   /* entries allocated in each array */
    float *z;      /* [cap] logits / temperature */
    float *p;      /* [cap] exp(z - max z) */
    uint8_t *keep; /* [cap] 1 when top-k / top-p keep the token */
    void *sorted;  /* [cap] (z, id) pairs for top-k / top-p */
} rlb_sample_ws;

void rlb__sample_ws_free(rlb_sample_ws *ws);

/* Checks a sampling parameter set: temperature finite and >= 0, top_p in (0, 1].
 * Returns 0 or RLB_EINVAL. */
int rlb__sampling_check(const rlb_sampling *sp);

/* 64 random bits of the 4-tuple, and the uniform u in (0, 1) made from them. */
uint64_t rlb__noise_bits(uint64_t seed, uint64_t sample, int64_t pos, int64_t token);
double rlb__noise_uniform(uint64_t seed, uint64_t sample, int64_t pos, int64_t token);

/* Samples the token at position `pos` of sample `sample` from logits[0..V). Writes the
 * token and its logprob. Returns 0, RLB_EINVAL (bad parameters), RLB_ENONFINITE (no token
 * left, see above) or RLB_ENOMEM. */
int rlb__sample_token(const float *logits, int64_t V, const rlb_sampling *sp, uint64_t sample,
                      int64_t pos, rlb_sample_ws *ws, int32_t *token, float *logprob);

/* The top-k / top-p filter alone: keep[i] = 1 for the tokens sampling may return (greedy:
 * only the argmax). Returns the number kept, or RLB_EINVAL / RLB_ENONFINITE / RLB_ENOMEM.
 * Tests compare it
 * with a brute-force reference. */
int64_t rlb__sample_filter(const float *logits, int64_t V, const rlb_sampling *sp,
                           rlb_sample_ws *ws, uint8_t *keep);

#endif /* RLB_KERNELS_CPU_SAMPLE_H */
