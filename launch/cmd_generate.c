/* cmd_generate.c: `rlb generate`, generation straight from a HF checkpoint directory
 * (config.json + safetensors) on the CPU engine, one JSON line per sample on stdout:
 *   {"index": j, "tokens": [...], "logprobs": [...], "finish_reason": "stop"|"length"}
 *
 * With --tp T the command runs as T processes: this one is rank 0 and prints, T - 1 forked
 * children are the other ranks; they all-reduce through one MAP_SHARED region (the
 * shared-memory communicator of common/tp_comm.h) and make the same engine calls in
 * lockstep. Rank 0 loads its weights before forking, so a bad checkpoint is reported once.
 * On the GPU each rank takes its own GPU (--gpu + rank) and the ranks all-reduce through
 * NCCL, whose unique id rank 0 hands the others through that region; no rank touches CUDA
 * before the fork.
 *
 * Exit status: 0 done, 1 the model or the run failed (missing files, shapes that do not
 * match the config, ids outside the vocabulary, a TP size the model cannot split into),
 * 2 bad usage (unknown option, malformed or out-of-range value).
 * Check: tests/unit/test_engine_generate.c.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/cli_args.h"
#include "launch/cmds.h"
#include "launch/launch.h"
#include "rlb/rlb.h"
#include "worker/backends.h"
#include "worker/daemon.h"
#include "worker/engine.h"
#include "worker/loader.h"

#define GEN_MAX_TP 64               /* --tp at most */
#define GEN_MAX_PROMPT (1 << 20)    /* --prompt-ids entries at most */
#define GEN_SLOT_FLOATS (1u << 16)  /* floats per TP exchange slot */
#define GEN_BLOCK_TOKENS 16         /* KV block size */

typedef struct gen_opts {
    const char *model;    /* checkpoint directory */
    int32_t *prompt;      /* [prompt_len] token ids */
    int64_t prompt_len;   /* entries in prompt */
    int32_t *stop;        /* [n_stop] stop token ids */
    int64_t n_stop;       /* entries in stop */
    long max_tokens;      /* per sample */
    rlb_sampling sp;      /* temperature, top_k, top_p, seed */
    long n;               /* samples */
    long tp;              /* T */
    long threads;         /* BLAS threads per rank; 0 = the RLB_THREADS knob */
    rlb_worker_opts be;   /* the backend options (device, dtype, quant, ...) */
    rlb_backend_choice choice; /* the backend they name, resolved */
} gen_opts;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: rlb generate --model DIR --prompt-ids ID,ID,... [options]\n"
            "  --model DIR          HF checkpoint directory (config.json + safetensors)\n"
            "  --prompt-ids LIST    comma-separated prompt token ids\n"
            "  --max-tokens N       tokens to generate per sample (default 16)\n"
            "  --temperature T      0 = greedy (default 1.0)\n"
            "  --top-k K            keep the K likeliest tokens; 0 or -1 = all (default 0)\n"
            "  --top-p P            nucleus mass in (0, 1] (default 1.0)\n"
            "  --seed S             sampling seed (default 0)\n"
            "  --n N                samples of the prompt (default 1)\n"
            "  --stop-ids LIST      comma-separated ids that end a sample (kept in it)\n"
            "  --tp T               tensor-parallel processes (default 1); on the GPU one GPU\n"
            "                       per rank, rank r on GPU --gpu + r, all-reducing through NCCL\n"
            RLB_BACKEND_USAGE
            "  --threads N          BLAS threads per process (default: RLB_THREADS)\n"
            "Prints one JSON line per sample: index, tokens, logprobs, finish_reason.\n");
}

static int bad_value(const char *opt, const char *val, const char *why)
{
    return rlb__cli_bad("generate", opt, val, why);
}

static int parse_long(const char *opt, const char *s, long lo, long hi, long *out)
{
    return rlb__cli_long("generate", opt, s, lo, hi, out);
}

static int parse_float(const char *opt, const char *s, double lo, double hi, float *out)
{
    return rlb__cli_float("generate", opt, s, lo, hi, out);
}

/* Parses "1,2,3" into a fresh array of ids in [0, INT32_MAX]. Returns 0 or 2. */
static int parse_ids(const char *opt, const char *s, int32_t **out, int64_t *n)
{
    int64_t cap = 1;
    for (const char *c = s; *c; c++)
        cap += *c == ',';
    if (cap > GEN_MAX_PROMPT)
        return bad_value(opt, "...", "too many ids");
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "rlb generate: out of memory\n");
        return 1;
    }
    const char *p = s;
    for (int64_t i = 0; i < cap; i++) {
        char *end;
        errno = 0;
        long v = *p >= '0' && *p <= '9' ? strtol(p, &end, 10) : -1;
        if (v < 0 || v > INT32_MAX || errno || (*end != ',' && *end != '\0')) {
            free(ids);
            return bad_value(opt, s, "expected comma-separated non-negative integers");
        }
        ids[i] = (int32_t)v;
        p = end + (*end == ',');
    }
    free(*out);
    *out = ids;
    *n = cap;
    return 0;
}

enum {
    OPT_MODEL = 256, OPT_PROMPT, OPT_MAX_TOKENS, OPT_TEMPERATURE, OPT_TOP_K, OPT_TOP_P,
    OPT_SEED, OPT_N, OPT_STOP, OPT_TP, OPT_THREADS, OPT_HELP
};

/* Fills `o` from the command line. Returns 0, 2 (bad usage, message printed) or -1
 * (--help printed). */
static int parse_args(int argc, char **argv, gen_opts *o)
{
    static const struct option longopts[] = {
        {"model", required_argument, NULL, OPT_MODEL},
        {"prompt-ids", required_argument, NULL, OPT_PROMPT},
        {"max-tokens", required_argument, NULL, OPT_MAX_TOKENS},
        {"temperature", required_argument, NULL, OPT_TEMPERATURE},
        {"top-k", required_argument, NULL, OPT_TOP_K},
        {"top-p", required_argument, NULL, OPT_TOP_P},
        {"seed", required_argument, NULL, OPT_SEED},
        {"n", required_argument, NULL, OPT_N},
        {"stop-ids", required_argument, NULL, OPT_STOP},
        {"tp", required_argument, NULL, OPT_TP},
        RLB_BACKEND_LONGOPTS,
        {"threads", required_argument, NULL, OPT_THREADS},
        {"help", no_argument, NULL, OPT_HELP},
        {NULL, 0, NULL, 0},
    };
    long top_k = 0, seed = 0;
    int c, rc = 0;
    optind = 1;
    opterr = 0;
    while (rc == 0 && (c = getopt_long_only(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_MODEL:
            o->model = optarg;
            break;
        case OPT_PROMPT:
            rc = parse_ids("prompt-ids", optarg, &o->prompt, &o->prompt_len);
            break;
        case OPT_STOP:
            rc = parse_ids("stop-ids", optarg, &o->stop, &o->n_stop);
            break;
        case OPT_MAX_TOKENS:
            rc = parse_long("max-tokens", optarg, 1, INT32_MAX, &o->max_tokens);
            break;
        case OPT_TEMPERATURE:
            rc = parse_float("temperature", optarg, 0.0, 1e6, &o->sp.temperature);
            break;
        case OPT_TOP_K:
            rc = parse_long("top-k", optarg, -1, INT32_MAX, &top_k);
            break;
        case OPT_TOP_P:
            rc = parse_float("top-p", optarg, 1e-9, 1.0, &o->sp.top_p);
            break;
        case OPT_SEED:
            rc = parse_long("seed", optarg, 0, LONG_MAX, &seed);
            break;
        case OPT_N:
            rc = parse_long("n", optarg, 1, RLB_ENGINE_MAX_N, &o->n);
            break;
        case OPT_TP:
            rc = parse_long("tp", optarg, 1, GEN_MAX_TP, &o->tp);
            break;
        case OPT_THREADS:
            rc = parse_long("threads", optarg, 0, 1024, &o->threads);
            break;
        case OPT_HELP:
            usage(stdout);
            return -1;
        default:
            if ((rc = rlb__backend_optarg("generate", c, optarg, &o->be)) == 1) {
                fprintf(stderr, "rlb generate: unknown or incomplete option '%s'\n",
                        argv[optind - 1]);
                rc = 2;
            }
        }
    }
    if (rc == 0 && optind < argc) {
        fprintf(stderr, "rlb generate: unexpected argument '%s'\n", argv[optind]);
        rc = 2;
    }
    if (rc == 0 && (!o->model || !o->prompt)) {
        fprintf(stderr, "rlb generate: --model and --prompt-ids are required\n");
        rc = 2;
    }
    if (rc == 0 && o->n_stop > RLB_ENGINE_MAX_STOP)
        rc = bad_value("stop-ids", "...", "too many ids");
    o->sp.top_k = (int32_t)(top_k < 0 ? 0 : top_k);
    o->sp.seed = (uint64_t)seed;
    if (rc == 2)
        usage(stderr);
    return rc;
}

/* Checks the prompt and stop ids against the vocabulary. Returns 0 or 1. */
static int check_ids(const gen_opts *o, int64_t vocab)
{
    const struct {
        const char *what;
        const int32_t *ids;
        int64_t n;
    } lists[2] = {{"prompt", o->prompt, o->prompt_len}, {"stop", o->stop, o->n_stop}};
    for (int l = 0; l < 2; l++)
        for (int64_t i = 0; i < lists[l].n; i++)
            if (lists[l].ids[i] >= vocab) {
                fprintf(stderr, "rlb generate: %s id %d at position %lld is outside the "
                        "vocabulary [0, %lld) of %s\n", lists[l].what, lists[l].ids[i],
                        (long long)i, (long long)vocab, o->model);
                return 1;
            }
    return 0;
}

static const char *finish_name(rlb_finish f)
{
    switch (f) {
    case RLB_FINISH_STOP: return "stop";
    case RLB_FINISH_LENGTH: return "length";
    case RLB_FINISH_ABORT: return "abort";
    default: return "none";
    }
}

static void print_sample(int32_t index, const rlb_gen_sample *s)
{
    printf("{\"index\": %d, \"tokens\": [", index);
    for (int64_t i = 0; i < s->n_tokens; i++)
        printf("%s%d", i ? ", " : "", s->tokens[i]);
    printf("], \"logprobs\": [");
    for (int64_t i = 0; i < s->n_tokens; i++)
        printf("%s%.9g", i ? ", " : "", (double)s->logprobs[i]);
    printf("], \"finish_reason\": \"%s\"}\n", finish_name(s->finish));
}

/* One rank's generation over its loaded weights; rank 0 prints. Returns 0 or 1. */
static int run_rank(const gen_opts *o, const rlb_loaded *m, rlb_tp_comm *comm)
{
    const rlb_model_config *cfg = &m->layout.cfg;
    int64_t longest = o->prompt_len + o->max_tokens;
    if (longest > cfg->max_pos)
        longest = cfg->max_pos;
    int64_t blocks = (longest + GEN_BLOCK_TOKENS - 1) / GEN_BLOCK_TOKENS;
    rlb_engine_opts eo = RLB_ENGINE_OPTS_INIT;
    eo.block_tokens = GEN_BLOCK_TOKENS;
    /* Room for every sample at full length, so none is ever preempted (blocks of the
     * weights' element type: the CUDA backend caches keys and values in it). */
    eo.kv_bytes = rlb__kv_block_bytes(cfg->n_layers, m->layout.kvt, cfg->head_dim,
                                      GEN_BLOCK_TOKENS) *
                  (uint64_t)(blocks * o->n + 1) / sizeof(float) *
                  rlb_dtype_size(m->layout.dtype);
    eo.quant = o->be.quant;
    eo.threads = (int32_t)o->threads;
    rlb_engine *e;
    rlb_ebackend *b = NULL;
    char err[512] = "";
    rlb_backend_choice choice = o->choice;
    choice.cuda_device += comm->rank; /* on the GPU, one per rank (NCCL takes no less) */
    int rc = rlb__backend_open(&m->layout, m->weights, comm, &choice, &b, NULL, err,
                               sizeof err);
    if (rc == 0)
        rc = rlb__engine_create_on(b, &eo, &e);
    if (rc) {
        fprintf(stderr, "rlb generate: rank %d: engine: %s%s%s\n", comm->rank,
                rlb_strerror(rc), *err ? ": " : "", err);
        return 1;
    }
    rlb_gen_request q = {.id = 1, .prompt = o->prompt, .prompt_len = o->prompt_len,
                         .n = (int32_t)o->n, .max_tokens = (int32_t)o->max_tokens,
                         .sampling = o->sp, .stop_ids = o->stop, .n_stop = (int32_t)o->n_stop,
                         .logprobs = 1};
    rc = rlb__engine_add(e, &q);
    while (rc == 0 && rlb__engine_busy(e)) {
        int n = rlb__engine_step(e);
        rc = n < 0 ? n : 0;
    }
    rlb_gen_result *r = NULL;
    if (rc == 0 && (rc = rlb__engine_pop(e, &r)) == 0 && comm->rank == 0)
        for (int32_t j = 0; j < r->n; j++)
            print_sample(j, &r->samples[j]);
    if (rc)
        fprintf(stderr, "rlb generate: rank %d: %s\n", comm->rank, rlb_strerror(rc));
    rlb__gen_result_free(r);
    rlb__engine_destroy(e);
    return rc ? 1 : 0;
}

/* Resolves the backend the options name. Returns 0 or 1 (refused, printed). */
static int choose_backend(gen_opts *o)
{
    rlb_backend_choice *c = &o->choice;
    *c = (rlb_backend_choice)RLB_BACKEND_CHOICE_INIT;
    rlb_device want = o->be.device == RLB_DEVICE_AUTO ? rlb__backend_device_env() : o->be.device;
    /* Ranks are forked, and CUDA started before a fork is unusable after it: with several
     * ranks "auto" looks for GPU device nodes instead of asking CUDA. */
    if (want == RLB_DEVICE_AUTO && o->tp > 1)
        want = rlb__launch_count_gpus() >= o->tp ? RLB_DEVICE_CUDA : RLB_DEVICE_CPU;
    c->device = rlb__backend_resolve(want);
    c->cuda_device = o->be.cuda_device;
    c->dtype = o->be.dtype;
    c->quant = o->be.quant;
    c->graphs = !o->be.no_graphs;
    c->batch_invariant = o->be.batch_invariant;
    if (o->be.gpu_memory_utilization > 0)
        c->gpu_memory_utilization = o->be.gpu_memory_utilization;
    c->max_batch_tokens = 512; /* the engine's defaults (engine.h) */
    c->max_seqs = 256;
    return 0;
}

/* Forks ranks 1..T-1, runs rank 0 here over `m`, then reaps the children. */
static int run_tp(const gen_opts *o, const rlb_loaded *m0)
{
    int T = (int)o->tp;
    rlb_tp_comm *comm = NULL;
    if (T == 1) {
        int rc = rlb__tp_comm_local(&comm) ? 1 : run_rank(o, m0, comm);
        rlb__tp_comm_destroy(comm);
        return rc;
    }
    size_t len = rlb__tp_shm_memsize(T, GEN_SLOT_FLOATS);
    void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED || rlb__tp_shm_init(mem, len, T, GEN_SLOT_FLOATS)) {
        fprintf(stderr, "rlb generate: cannot set up shared memory for %d ranks\n", T);
        if (mem != MAP_FAILED)
            munmap(mem, len);
        return 1;
    }
    fflush(NULL); /* children must not flush the parent's buffered output again */
    pid_t pids[GEN_MAX_TP];
    int n_children = 0, rc = 0;
    for (int r = 1; r < T && rc == 0; r++) {
        pid_t pid = fork();
        if (pid == 0) {
            char err[512];
            rlb_loaded m;
            int crc = rlb__load_checkpoint_as(o->model, T, r, rlb__backend_weight_dtype(&o->choice),
                                              &m, err, sizeof err);
            if (crc)
                fprintf(stderr, "rlb generate: rank %d: %s\n", r, err);
            else if (!(crc = rlb__tp_comm_shm_attach(mem, len, r, 0, &comm)))
                crc = run_rank(o, &m, comm);
            rlb__tp_comm_destroy(comm);
            rlb__loaded_free(&m);
            _exit(crc ? 1 : 0);
        }
        if (pid < 0) {
            fprintf(stderr, "rlb generate: fork: %s\n", strerror(errno));
            rc = 1;
        } else {
            pids[n_children++] = pid;
        }
    }
    /* With a fork failed, rank 0 still attaches: the children then see it leave (or
     * never arrive) and stop at their collective's timeout instead of waiting forever. */
    int arc = rlb__tp_comm_shm_attach(mem, len, 0, 0, &comm);
    if (rc == 0)
        rc = arc ? 1 : run_rank(o, m0, comm);
    rlb__tp_comm_destroy(comm);
    for (int i = 0; i < n_children; i++) {
        int st;
        while (waitpid(pids[i], &st, 0) < 0 && errno == EINTR)
            ;
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "rlb generate: rank %d failed\n", i + 1);
            rc = 1;
        }
    }
    munmap(mem, len);
    return rc;
}

int rlb__cmd_generate(int argc, char **argv)
{
    gen_opts o = {.max_tokens = 16, .sp = {.temperature = 1.0f, .top_p = 1.0f}, .n = 1,
                  .tp = 1, .be = RLB_WORKER_OPTS_INIT};
    o.be.dtype = RLB_DTYPE_BF16; /* on a GPU; the CPU backend is float32 */
    int rc = parse_args(argc, argv, &o);
    if (rc) {
        free(o.prompt);
        free(o.stop);
        return rc < 0 ? 0 : rc;
    }
    char err[512];
    rlb_model_config cfg;
    rlb_loaded m = {0};
    if (rlb__config_load_dir(o.model, &cfg, err, sizeof err) ||
        rlb__tp_check(&cfg, (int)o.tp, err, sizeof err)) {
        fprintf(stderr, "rlb generate: %s\n", err);
        rc = 1;
    } else if (!(rc = check_ids(&o, cfg.vocab)) && !(rc = choose_backend(&o))) {
        if (rlb__load_checkpoint_as(o.model, (int)o.tp, 0, rlb__backend_weight_dtype(&o.choice),
                                    &m, err, sizeof err)) {
            fprintf(stderr, "rlb generate: %s\n", err);
            rc = 1;
        } else {
            rc = run_tp(&o, &m);
        }
    }
    rlb__loaded_free(&m);
    free(o.prompt);
    free(o.stop);
    return rc;
}
