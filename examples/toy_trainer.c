/* toy_trainer.c: a real learning loop through rlbridge's public API only (include/rlb/rlb.h):
 * evolution strategies on the built-in tiny model, no autograd.
 *
 * The trainer owns the model's weights (the tiny Llama of `rlb bridge --tiny`: D 64, I 192,
 * H 4, KV 2, hd 16, 2 layers, V 250, untied, F32) in shared memory from rlb_alloc_host and
 * registers every tensor once. Each step it draws K Gaussian directions e_k over the
 * trained tensors (the LM head by default, every weight with --all) and evaluates the
 * antithetic pair theta +- sigma e_k: write the weights in place, rlb_publish (one weight
 * version each), rlb_generate rollouts from fixed prompts, and score them. The reward of a
 * rollout is the fraction of its tokens that equal the target token. Both members of a
 * pair sample with the same seed (common random numbers), so their reward difference
 * measures the direction, not the sampling noise. The update is the ES gradient estimate
 * with rewards divided by their spread s over the step's 2K evaluations:
 *   theta += lr / (2 K sigma s) * sum_k (R(theta + sigma e_k) - R(theta - sigma e_k)) e_k.
 * Finally theta itself is published and evaluated: that is the step's reported reward.
 *
 * Each step prints one line: step, weight version, sync ms and GB/s of the step's
 * publishes, generation tokens/s, mean reward of theta. With --check the exit status says
 * whether the reward rose (mean of the last 10 steps above the first 10 by a margin).
 *
 *   rlb-toy-trainer --socket PATH [--steps 50] [--pairs 4] [--sigma 0.3] [--lr 0.3]
 *                   [--target 42] [--seed 1] [--all] [--check] [--quiet]
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "rlb/rlb.h"

/* The built-in tiny model (`--tiny`). */
enum { D = 64, I = 192, H = 4, KV = 2, HD = 16, LAYERS = 2, V = 250 };

#define MAX_TENSORS (3 + 9 * LAYERS)
#define N_PROMPTS 8      /* prompts per evaluation */
#define PROMPT_LEN 4     /* tokens per prompt */
#define SAMPLES 2        /* samples per prompt */
#define GEN_TOKENS 16    /* tokens per sample */
#define EVAL_SAMPLES 4   /* samples per prompt when scoring theta itself */
#define CHECK_WINDOW 10  /* steps averaged at each end for --check */
#define CHECK_MARGIN 0.05 /* reward rise --check requires */

typedef struct tensor {
    char name[64];  /* HF name */
    uint64_t rows;  /* d0 */
    uint64_t cols;  /* d1, 1 for vectors */
    int ndim;       /* 1 or 2 */
    size_t offset;  /* element offset in the parameter buffer */
    int trained;    /* perturbed and updated by ES */
} tensor;

typedef struct options {
    const char *socket; /* bridge socket (NULL = default) */
    int steps;          /* ES steps */
    int pairs;          /* antithetic pairs per step */
    double sigma;       /* perturbation scale */
    double lr;          /* step size */
    int target;         /* token whose frequency is the reward */
    uint64_t seed;      /* of the initial weights, directions, prompts and sampling */
    int all;            /* perturb every tensor, not only the LM head */
    int check;          /* exit 3 unless the reward rose */
    int quiet;          /* print only the summary */
} options;

typedef struct trainer {
    rlb_client *c;
    tensor t[MAX_TENSORS];
    int n_tensors;
    size_t n_params;     /* floats in the parameter buffer */
    float *live;         /* registered shared memory: what the bridge syncs */
    float *theta;        /* the current solution (private) */
    float *noise;        /* [pairs][n_params] directions of this step, trained part only */
    int32_t prompts[N_PROMPTS][PROMPT_LEN];
    uint64_t version;    /* last published version */
    double sync_ms;      /* this step: publish time summed */
    double sync_bytes;   /* this step: bytes synced */
    double gen_s;        /* this step: generate wall time */
    uint64_t gen_tokens; /* this step: tokens generated */
} trainer;

/* ---- randomness (splitmix64 + Box-Muller) ------------------------------------------ */

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double uniform(uint64_t *s)
{
    return ((splitmix(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static float gaussian(uint64_t *s)
{
    return (float)(sqrt(-2.0 * log(uniform(s))) * cos(6.283185307179586 * uniform(s)));
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- the model's tensors ------------------------------------------------------------ */

static void add(trainer *tr, const char *name, uint64_t rows, uint64_t cols, int ndim)
{
    tensor *t = &tr->t[tr->n_tensors++];
    snprintf(t->name, sizeof(t->name), "%s", name);
    t->rows = rows;
    t->cols = cols;
    t->ndim = ndim;
    t->offset = tr->n_params;
    tr->n_params += rows * cols;
}

/* The tiny Llama's parameters, named as HF names them. */
static void layout(trainer *tr, int all)
{
    char n[64];
    add(tr, "model.embed_tokens.weight", V, D, 2);
    for (int l = 0; l < LAYERS; l++) {
        const struct {
            const char *suffix;
            uint64_t rows, cols;
            int ndim;
        } per_layer[] = {
            {"input_layernorm.weight", D, 1, 1},
            {"self_attn.q_proj.weight", H * HD, D, 2},
            {"self_attn.k_proj.weight", KV * HD, D, 2},
            {"self_attn.v_proj.weight", KV * HD, D, 2},
            {"self_attn.o_proj.weight", D, H * HD, 2},
            {"post_attention_layernorm.weight", D, 1, 1},
            {"mlp.gate_proj.weight", I, D, 2},
            {"mlp.up_proj.weight", I, D, 2},
            {"mlp.down_proj.weight", D, I, 2},
        };
        for (size_t k = 0; k < sizeof(per_layer) / sizeof(per_layer[0]); k++) {
            snprintf(n, sizeof(n), "model.layers.%d.%s", l, per_layer[k].suffix);
            add(tr, n, per_layer[k].rows, per_layer[k].cols, per_layer[k].ndim);
        }
    }
    add(tr, "model.norm.weight", D, 1, 1);
    add(tr, "lm_head.weight", V, D, 2);
    for (int i = 0; i < tr->n_tensors; i++)
        tr->t[i].trained = all || !strcmp(tr->t[i].name, "lm_head.weight");
}

/* Norms start at 1, the embedding at N(0, 1) so that hidden states carry the prompt, the
 * other matrices at N(0, 0.08^2). */
static void init_weights(trainer *tr, uint64_t seed)
{
    uint64_t s = seed * 7919 + 1;
    for (int i = 0; i < tr->n_tensors; i++) {
        const tensor *t = &tr->t[i];
        float *w = tr->theta + t->offset;
        float scale = i == 0 ? 1.0f : 0.08f;
        for (uint64_t k = 0; k < t->rows * t->cols; k++)
            w[k] = t->ndim == 1 ? 1.0f : scale * gaussian(&s);
    }
}

static int connect_and_register(trainer *tr, const options *o)
{
    rlb_client_options co;
    rlb_client_options_init(&co);
    co.socket = o->socket;
    co.connect_timeout_ms = 10000;
    int rc = rlb_connect(&co, &tr->c);
    if (rc < 0) {
        fprintf(stderr, "toy_trainer: connect: %s\n", rlb_last_error(NULL));
        return rc;
    }
    rc = rlb_alloc_host(tr->c, tr->n_params * sizeof(float), (void **)&tr->live);
    if (rc < 0)
        goto err;
    /* Versions must grow across runs against the same bridge: go on from its newest. */
    tr->version = rlb_weight_version(tr->c);
    rlb_tensor_desc d[MAX_TENSORS];
    for (int i = 0; i < tr->n_tensors; i++) {
        const tensor *t = &tr->t[i];
        rlb_tensor_desc_init(&d[i]);
        d[i].name = t->name;
        d[i].dtype = RLB_DTYPE_F32;
        d[i].ndim = (uint32_t)t->ndim;
        d[i].shape[0] = t->rows;
        d[i].shape[1] = t->cols;
        d[i].data = tr->live + t->offset;
    }
    rc = rlb_register(tr->c, d, (size_t)tr->n_tensors);
    if (rc < 0)
        goto err;
    return 0;
err:
    fprintf(stderr, "toy_trainer: %s\n", rlb_last_error(tr->c));
    return rc;
}

/* ---- evaluation ----------------------------------------------------------------------- */

/* Writes w (+ sign * sigma * dir over the trained tensors when dir is non-NULL) into the
 * registered memory and publishes it as the next version. */
static int publish(trainer *tr, const float *dir, float sign_sigma)
{
    memcpy(tr->live, tr->theta, tr->n_params * sizeof(float));
    if (dir)
        for (int i = 0; i < tr->n_tensors; i++) {
            const tensor *t = &tr->t[i];
            if (!t->trained)
                continue;
            for (uint64_t k = 0; k < t->rows * t->cols; k++)
                tr->live[t->offset + k] += sign_sigma * dir[t->offset + k];
        }
    rlb_sync_stats st = {.struct_size = sizeof(st)};
    int rc = rlb_publish(tr->c, ++tr->version, &st);
    if (rc < 0) {
        fprintf(stderr, "toy_trainer: publish %llu: %s\n", (unsigned long long)tr->version,
                rlb_last_error(tr->c));
        return rc;
    }
    tr->sync_ms += st.ms;
    tr->sync_bytes += (double)st.bytes;
    return 0;
}

/* Generates from the fixed prompts with the weights just published and returns, in *reward,
 * the fraction of generated tokens equal to the target. */
static int evaluate(trainer *tr, const options *o, uint64_t seed, uint32_t n, double *reward)
{
    rlb_prompt p[N_PROMPTS];
    for (int i = 0; i < N_PROMPTS; i++)
        p[i] = (rlb_prompt){tr->prompts[i], PROMPT_LEN};
    rlb_sampling_params sp;
    rlb_sampling_params_init(&sp);
    sp.n = n;
    sp.temperature = 1.0f;
    sp.max_tokens = GEN_TOKENS;
    sp.seed = (int64_t)(seed >> 2);
    rlb_generate_request req;
    rlb_generate_request_init(&req);
    req.prompts = p;
    req.n_prompts = N_PROMPTS;
    req.sampling = &sp;
    req.min_weight_version = tr->version;
    rlb_result *r = NULL;
    double t0 = now_s();
    int rc = rlb_generate(tr->c, &req, 60000, &r);
    tr->gen_s += now_s() - t0;
    if (rc < 0) {
        fprintf(stderr, "toy_trainer: generate: %s\n", rlb_last_error(tr->c));
        return rc;
    }
    uint64_t hits = 0, total = 0;
    for (size_t i = 0; i < rlb_result_num_samples(r); i++) {
        const rlb_sample *s = rlb_result_sample(r, i);
        if (s->weight_version != tr->version) {
            fprintf(stderr, "toy_trainer: a sample came from version %llu, not %llu\n",
                    (unsigned long long)s->weight_version, (unsigned long long)tr->version);
            rlb_result_free(r);
            return RLB_EPROTO;
        }
        for (uint32_t k = 0; k < s->n_tokens; k++)
            hits += s->tokens[k] == o->target;
        total += s->n_tokens;
    }
    rlb_result_free(r);
    tr->gen_tokens += total;
    *reward = total ? (double)hits / (double)total : 0.0;
    return 0;
}

/* One ES step; *reward gets theta's reward after the update. */
static int step(trainer *tr, const options *o, int it, double *reward)
{
    uint64_t s = o->seed * 1000003 + (uint64_t)it;
    double diff[64], sum = 0, sum2 = 0;
    for (int k = 0; k < o->pairs; k++) {
        float *e = tr->noise + (size_t)k * tr->n_params;
        for (int i = 0; i < tr->n_tensors; i++)
            if (tr->t[i].trained)
                for (uint64_t j = 0; j < tr->t[i].rows * tr->t[i].cols; j++)
                    e[tr->t[i].offset + j] = gaussian(&s);
        uint64_t sample_seed = splitmix(&s);
        double rp, rm;
        int rc = publish(tr, e, (float)o->sigma);
        if (rc == 0)
            rc = evaluate(tr, o, sample_seed, SAMPLES, &rp);
        if (rc == 0)
            rc = publish(tr, e, (float)-o->sigma);
        if (rc == 0)
            rc = evaluate(tr, o, sample_seed, SAMPLES, &rm);
        if (rc < 0)
            return rc;
        diff[k] = rp - rm;
        sum += rp + rm;
        sum2 += rp * rp + rm * rm;
    }
    /* Rewards are normalized by their spread in this step, so lr is a step length that
     * neither a flat start (all rewards near 0) nor a late, noisy phase rescales. */
    double n = 2.0 * o->pairs, mean = sum / n, var = sum2 / n - mean * mean;
    double spread = sqrt(var > 0 ? var : 0) + 1e-3;
    float scale = (float)(o->lr / (2.0 * o->pairs * o->sigma * spread));
    for (int i = 0; i < tr->n_tensors; i++) {
        const tensor *t = &tr->t[i];
        if (!t->trained)
            continue;
        for (uint64_t j = 0; j < t->rows * t->cols; j++) {
            double g = 0;
            for (int k = 0; k < o->pairs; k++)
                g += diff[k] * tr->noise[(size_t)k * tr->n_params + t->offset + j];
            tr->theta[t->offset + j] += scale * (float)g;
        }
    }
    int rc = publish(tr, NULL, 0);
    return rc < 0 ? rc : evaluate(tr, o, splitmix(&s), EVAL_SAMPLES, reward);
}

/* ---- main ------------------------------------------------------------------------------- */

static int usage(void)
{
    fprintf(stderr, "usage: rlb-toy-trainer [--socket PATH] [--steps N] [--pairs K] "
                    "[--sigma S] [--lr LR] [--target TOKEN] [--seed N] [--all] [--check] "
                    "[--quiet]\n");
    return 2;
}

/* The whole of v as a number within [lo, hi], or a line naming the option and 0. */
static int number(const char *opt, const char *v, double lo, double hi, int integer, double *out)
{
    char *end = NULL;
    errno = 0;
    const double x = integer ? (double)strtoll(v, &end, 10) : strtod(v, &end);
    if (end == v || *end || errno || !(x >= lo && x <= hi)) {
        fprintf(stderr, "rlb-toy-trainer: bad value '%s' for %s: %s in [%g, %g] expected\n",
                v, opt, integer ? "an integer" : "a number", lo, hi);
        return 0;
    }
    *out = x;
    return 1;
}

/* The whole of v as a decimal uint64 (rlb demo passes its seed so), or a line and 0. */
static int seed_of(const char *v, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    const unsigned long long x = strtoull(v, &end, 10);
    if (end == v || *end || errno || *v < '0' || *v > '9') {
        fprintf(stderr, "rlb-toy-trainer: bad value '%s' for --seed: a decimal integer in "
                        "[0, 2^64) expected\n", v);
        return 0;
    }
    *out = x;
    return 1;
}

static int parse(int argc, char **argv, options *o)
{
    *o = (options){.steps = 50, .pairs = 4, .sigma = 0.3, .lr = 0.3, .target = 42, .seed = 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--all"))
            o->all = 1;
        else if (!strcmp(a, "--check"))
            o->check = 1;
        else if (!strcmp(a, "--quiet"))
            o->quiet = 1;
        else if (!v)
            return usage();
        else if (!strcmp(a, "--socket"))
            o->socket = v, i++;
        else {
            double x;
            i++;
            if (!strcmp(a, "--steps") && number(a, v, 1, 1e6, 1, &x))
                o->steps = (int)x;
            else if (!strcmp(a, "--pairs") && number(a, v, 1, 64, 1, &x))
                o->pairs = (int)x;
            else if (!strcmp(a, "--sigma") && number(a, v, 1e-9, 1e3, 0, &x))
                o->sigma = x;
            else if (!strcmp(a, "--lr") && number(a, v, 1e-9, 1e3, 0, &x))
                o->lr = x;
            else if (!strcmp(a, "--target") && number(a, v, 0, V - 1, 1, &x))
                o->target = (int)x;
            else if (strcmp(a, "--seed") || !seed_of(v, &o->seed))
                return usage();
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    options o;
    if (parse(argc, argv, &o))
        return 2;
    trainer tr = {0};
    layout(&tr, o.all);
    tr.theta = malloc(tr.n_params * sizeof(float));
    tr.noise = calloc((size_t)o.pairs * tr.n_params, sizeof(float));
    double *curve = calloc((size_t)o.steps, sizeof(double));
    int rc = 1;
    if (!tr.theta || !tr.noise || !curve)
        goto out;
    init_weights(&tr, o.seed);
    uint64_t s = o.seed;
    for (int i = 0; i < N_PROMPTS; i++)
        for (int k = 0; k < PROMPT_LEN; k++)
            tr.prompts[i][k] = (int32_t)(splitmix(&s) % V);
    if (connect_and_register(&tr, &o) < 0)
        goto out;
    if (!o.quiet)
        printf("toy trainer: ES on the tiny model (%zu weights, %s perturbed), %d pairs per "
               "step, target token %d\n",
               tr.n_params, o.all ? "all" : "LM head", o.pairs, o.target);
    for (int it = 0; it < o.steps; it++) {
        tr.sync_ms = tr.sync_bytes = tr.gen_s = 0;
        tr.gen_tokens = 0;
        if (step(&tr, &o, it, &curve[it]) < 0)
            goto out;
        int publishes = 2 * o.pairs + 1;
        if (!o.quiet)
            printf("step %3d  version %5llu  sync %6.2f ms %6.2f GB/s  gen %8.0f tok/s  "
                   "reward %.4f\n",
                   it + 1, (unsigned long long)tr.version, tr.sync_ms / publishes,
                   tr.sync_ms > 0 ? tr.sync_bytes / (tr.sync_ms * 1e6) : 0.0,
                   tr.gen_s > 0 ? tr.gen_tokens / tr.gen_s : 0.0, curve[it]);
        fflush(stdout);
    }
    int w = o.steps < 2 * CHECK_WINDOW ? o.steps / 2 : CHECK_WINDOW;
    double first = 0, last = 0;
    for (int i = 0; i < w; i++) {
        first += curve[i] / w;
        last += curve[o.steps - 1 - i] / w;
    }
    printf("reward: mean of the first %d steps %.4f, of the last %d steps %.4f (%s)\n", w,
           first, w, last, last > first + CHECK_MARGIN ? "rose" : "did not rise");
    rc = o.check && !(last > first + CHECK_MARGIN) ? 3 : 0;
out:
    rlb_close(tr.c);
    free(tr.theta);
    free(tr.noise);
    free(curve);
    return rc;
}
