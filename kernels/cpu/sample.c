/* sample.c: greedy / temperature / top-k / top-p sampling and the per-token logprob (the
 * semantics are in sample.h). Check: tests/unit/test_engine_sample.c compares the filter
 * with a brute-force reference on small vocabularies and the sampled frequencies with the
 * filtered softmax. */
#include "kernels/cpu/sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/noise.h"

typedef struct zpair {
    float z;    /* logit / temperature */
    int32_t id; /* token id */
} zpair;

void rlb__sample_ws_free(rlb_sample_ws *ws)
{
    free(ws->z);
    free(ws->p);
    free(ws->keep);
    free(ws->sorted);
    memset(ws, 0, sizeof *ws);
}

static int ws_reserve(rlb_sample_ws *ws, int64_t V)
{
    if (ws->cap >= V)
        return 0;
    rlb__sample_ws_free(ws);
    ws->z = malloc((size_t)V * sizeof *ws->z);
    ws->p = malloc((size_t)V * sizeof *ws->p);
    ws->keep = malloc((size_t)V);
    ws->sorted = malloc((size_t)V * sizeof(zpair));
    if (!ws->z || !ws->p || !ws->keep || !ws->sorted) {
        rlb__sample_ws_free(ws);
        return RLB_ENOMEM;
    }
    ws->cap = V;
    return 0;
}

int rlb__sampling_check(const rlb_sampling *sp)
{
    if (!sp || !isfinite(sp->temperature) || sp->temperature < 0.0f)
        return RLB_EINVAL;
    if (!(sp->top_p > 0.0f && sp->top_p <= 1.0f))
        return RLB_EINVAL;
    return 0;
}

uint64_t rlb__noise_bits(uint64_t seed, uint64_t sample, int64_t pos, int64_t token)
{
    return rlb__noise_token(rlb__noise_prefix(seed, sample, pos), token);
}

double rlb__noise_uniform(uint64_t seed, uint64_t sample, int64_t pos, int64_t token)
{
    return rlb__bits_to_uniform(rlb__noise_bits(seed, sample, pos, token));
}

static int greedy(const rlb_sampling *sp)
{
    return sp->temperature <= RLB_SAMPLE_GREEDY_EPS;
}

/* z = logits / T (T = 1 for greedy), p = exp(z - max z), *lse = logsumexp(z), under the
 * non-finite rules of sample.h: NaN counts as -inf; when some z is +inf (a +inf logit, or a
 * finite one that overflowed in the division), those tokens are the limit of the softmax,
 * so they get z = 0 and every other token -inf. Returns 0 or RLB_ENONFINITE when no token
 * is left (every z NaN or -inf). */
static int prepare(const float *logits, int64_t V, const rlb_sampling *sp, rlb_sample_ws *ws,
                   double *lse)
{
    float T = greedy(sp) ? 1.0f : sp->temperature;
    float zmax = -INFINITY;
    int64_t n_inf = 0;
    for (int64_t i = 0; i < V; i++) {
        float z = logits[i] / T;
        z = isnan(z) ? -INFINITY : z;
        n_inf += z == INFINITY;
        ws->z[i] = z;
        zmax = z > zmax ? z : zmax;
    }
    if (n_inf) {
        for (int64_t i = 0; i < V; i++)
            ws->z[i] = ws->z[i] == INFINITY ? 0.0f : -INFINITY;
        zmax = 0.0f;
    }
    if (zmax == -INFINITY)
        return RLB_ENONFINITE;
    double sum = 0.0;
    for (int64_t i = 0; i < V; i++) {
        ws->p[i] = expf(ws->z[i] - zmax);
        sum += ws->p[i];
    }
    *lse = (double)zmax + log(sum);
    return 0;
}

static int64_t argmax_first(const float *z, int64_t V)
{
    int64_t best = 0;
    for (int64_t i = 1; i < V; i++)
        if (z[i] > z[best])
            best = i;
    return best;
}

/* The element that would sit at index `nth` if a[0..n) were sorted ascending
 * (quickselect, median-of-three pivot). Reorders a. */
static float select_nth(float *a, int64_t n, int64_t nth)
{
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        float x = a[lo], y = a[mid], z = a[hi];
        float pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot)
                i++;
            while (a[j] > pivot)
                j--;
            if (i <= j) {
                float t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (nth <= j)
            hi = j;
        else if (nth >= i)
            lo = i;
        else
            return a[nth];
    }
    return a[nth];
}

static int cmp_desc(const void *pa, const void *pb)
{
    const zpair *a = pa, *b = pb;
    if (a->z != b->z)
        return a->z > b->z ? -1 : 1;
    return (a->id > b->id) - (a->id < b->id);
}

/* Marks ws->keep for the sampled (non-greedy) case after prepare(); returns the count. */
static int64_t filter_kept(int64_t V, const rlb_sampling *sp, rlb_sample_ws *ws)
{
    memset(ws->keep, 1, (size_t)V);
    int64_t n_kept = V;
    if (sp->top_k > 0 && sp->top_k < V) {
        float *tmp = (float *)ws->sorted;
        memcpy(tmp, ws->z, (size_t)V * sizeof *tmp);
        float thr = select_nth(tmp, V, V - sp->top_k);
        n_kept = 0;
        for (int64_t i = 0; i < V; i++) {
            ws->keep[i] = ws->z[i] >= thr;
            n_kept += ws->keep[i];
        }
    }
    if (sp->top_p < 1.0f) {
        double mass = 0.0;
        for (int64_t i = 0; i < V; i++)
            if (ws->keep[i])
                mass += ws->p[i];
        /* A token whose share is below (1 - top_p) / n_kept has at least top_p of the mass
         * above it (all tokens no likelier than it hold less than 1 - top_p), so only the
         * tokens at or above that share need sorting. */
        double bound = (1.0 - (double)sp->top_p) / (double)n_kept * mass;
        zpair *cand = ws->sorted;
        int64_t n_cand = 0;
        for (int64_t i = 0; i < V; i++) {
            if (ws->keep[i] && (double)ws->p[i] >= bound)
                cand[n_cand++] = (zpair){ws->z[i], (int32_t)i};
            ws->keep[i] = 0;
        }
        qsort(cand, (size_t)n_cand, sizeof *cand, cmp_desc);
        double above = 0.0, limit = (double)sp->top_p * mass;
        n_kept = 0;
        for (int64_t c = 0; c < n_cand && above < limit; c++) {
            ws->keep[cand[c].id] = 1;
            n_kept++;
            above += ws->p[cand[c].id];
        }
    }
    return n_kept;
}

/* Checks the arguments, sizes the scratch and runs prepare(). Returns 0 or an error. */
static int begin(const float *logits, int64_t V, const rlb_sampling *sp, rlb_sample_ws *ws,
                 double *lse)
{
    if (!logits || V < 1 || V > INT32_MAX || rlb__sampling_check(sp))
        return RLB_EINVAL;
    int rc = ws_reserve(ws, V);
    return rc ? rc : prepare(logits, V, sp, ws, lse);
}

int64_t rlb__sample_filter(const float *logits, int64_t V, const rlb_sampling *sp,
                           rlb_sample_ws *ws, uint8_t *keep)
{
    double lse;
    int rc = begin(logits, V, sp, ws, &lse);
    if (rc)
        return rc;
    if (greedy(sp)) {
        memset(keep, 0, (size_t)V);
        keep[argmax_first(ws->z, V)] = 1;
        return 1;
    }
    int64_t n = filter_kept(V, sp, ws);
    memcpy(keep, ws->keep, (size_t)V);
    return n;
}

int rlb__sample_token(const float *logits, int64_t V, const rlb_sampling *sp, uint64_t sample,
                      int64_t pos, rlb_sample_ws *ws, int32_t *token, float *logprob)
{
    double lse;
    int rc = begin(logits, V, sp, ws, &lse);
    if (rc)
        return rc;
    int64_t best = 0;
    if (greedy(sp)) {
        best = argmax_first(ws->z, V);
    } else {
        filter_kept(V, sp, ws);
        uint64_t prefix = rlb__noise_prefix(sp->seed, sample, pos);
        double best_score = -1.0;
        for (int64_t i = 0; i < V; i++) {
            if (!ws->keep[i])
                continue;
            /* exp(z - max) / E with E = -log(u) ~ Exp(1): argmax = Gumbel-max */
            const double score = rlb__race_score(
                ws->p[i], rlb__bits_to_uniform(rlb__noise_token(prefix, i)), best_score);
            if (score > best_score) {
                best_score = score;
                best = i;
            }
        }
    }
    *token = (int32_t)best;
    *logprob = (float)((double)ws->z[best] - lse);
    return 0;
}
