/* xnode_trainer.c: the trainer script of the multi-node tests (test_xnode.py), run by
 * `rlb launch --no-python` on every node with torchrun's environment.
 *
 *   xnode_trainer [--layout fsdp2|fsdp1|split] [--versions N] [--check] [--lora]
 *                 [--republish N] (publish an aborted version again, up to N times)
 *                 [--die RANK:V:when]   when: before (kill -9 itself before publishing V),
 *                                       during (a helper kills it just after), or stall
 *                                       (sleep two minutes instead of publishing V)
 *
 * Each rank registers its FSDP shard of the tiny model (bridge_harness.c: rank = FSDP rank,
 * world = WORLD_SIZE, the weights a pure function of version, tensor and element) with its
 * node's bridge, then publishes versions from the bridge's committed version + 1 (so a
 * restarted group goes on) to N. With --check, local rank 0 reads every worker buffer of its
 * node after each commit (found through /proc: the memfd "rlb-weights-0" of each `rlb
 * worker` of this node's socket) and compares it element by element with the naive
 * reference of tests/unit/plan_ref.h (h_check_buffer).
 * With --lora every rank declares LoRA adapters (rank 4, alpha 8) on the seven targets of
 * every layer and registers their factors beside the base, in the same FSDP layout; the
 * base stays version 1's weights, the factors are a pure function of (version, name,
 * element); with --layout split (whole tensors spread over the ranks, bridge_harness.h) each
 * rank declares only the adapters whose factors it registers, so each node's bridge knows
 * only some of them. --check then compares each worker element with W + s * B * A computed here in
 * double (check_lora_buffer), and local rank 0 prints after each commit what its bridge
 * received from other nodes in all (stat xnode_bytes_received) and the base and factor bytes
 * the other nodes' ranks hold (from the shards it registered, not from the bridge):
 * "xnode bytes V: received R, remote base B, remote factors F".
 * Prints "synced V", "aborted V: reason", "done"; exits 0, or 3 after an abort, 1 on a
 * mismatch (naming the first wrong element), 77 when /proc/PID/mem cannot be read.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "model/lora.h"
#include "model/params.h"
#include "tests/integration/bridge_harness.h"
#include "tests/unit/plan_ref.h"

#define LORA_RANK 4
#define LORA_ALPHA 8.0f


static long env_int(const char *name)
{
    const char *v = getenv(name);
    if (!v) {
        fprintf(stderr, "xnode_trainer: %s is not set (run it under rlb launch)\n", name);
        exit(2);
    }
    return atol(v);
}

/* The worker of this node with TP rank tp: its pid and TP size, or -1. */
static pid_t find_worker(const char *sock, int tp, int *tp_size)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    pid_t found = -1;
    while (d && found < 0 && (e = readdir(d))) {
        if (!isdigit((unsigned char)e->d_name[0]))
            continue;
        char path[300], args[4096];
        snprintf(path, sizeof(path), "/proc/%s/cmdline", e->d_name);
        int fd = open(path, O_RDONLY);
        ssize_t n = fd >= 0 ? read(fd, args, sizeof(args) - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (n <= 0)
            continue;
        args[n] = 0;
        const char *argv[64];
        int argc = 0;
        for (ssize_t at = 0; at < n && argc < 64; at += (ssize_t)strlen(args + at) + 1)
            argv[argc++] = args + at;
        int worker = 0, mine = 0, rank = -1, size = 1;
        for (int i = 0; i < argc; i++) {
            worker |= !strcmp(argv[i], "worker");
            if (i + 1 < argc && !strcmp(argv[i], "--bridge"))
                mine = !strcmp(argv[i + 1], sock);
            if (i + 1 < argc && !strcmp(argv[i], "--tp-rank"))
                rank = atoi(argv[i + 1]);
            if (i + 1 < argc && !strcmp(argv[i], "--tp-size"))
                size = atoi(argv[i + 1]);
        }
        if (worker && mine && rank == tp) {
            found = (pid_t)atoi(e->d_name);
            *tp_size = size;
        }
    }
    if (d)
        closedir(d);
    return found;
}

/* The tiny model's parameters with an adapter on every target of every layer. */
static int lora_list(rlb_param_list *l)
{
    char err[256] = "", name[96];
    int rc = rlb__params_init(l, &h_params()->cfg, err, sizeof(err));
    for (int layer = 0; rc == 0 && layer < (int)l->cfg.n_layers; layer++)
        for (size_t k = 0; rc == 0 && k < H_LORA_TARGETS; k++) {
            snprintf(name, sizeof(name), "model.layers.%d.%s.weight", layer, h_lora_targets[k]);
            rc = rlb__params_add_adapter(l, name, LORA_RANK, LORA_ALPHA / LORA_RANK, err,
                                         sizeof(err));
        }
    if (rc)
        fprintf(stderr, "xnode_trainer: adapters: %s\n", err);
    return rc;
}

/* Version v's values of ref parameter p, row-major in double: its base (version 1), and
 * for a target its factors A [r, in] and B [out, r]. */
typedef struct ref_values {
    double *w, *a, *b;
} ref_values;

static int is_target(int which)
{
    return which == P_Q || which == P_K || which == P_V || which == P_O || which == P_GATE ||
           which == P_UP || which == P_DOWN;
}

static void ref_values_fill(ref_values *rv, const ref_param *p, uint64_t v)
{
    uint64_t n = (uint64_t)(p->rows * p->cols);
    int64_t tiny = 0;
    while (strcmp(h_params()->params[tiny].name, p->name))
        tiny++;
    rv->w = malloc(n * sizeof(double));
    for (uint64_t i = 0; i < n; i++)
        rv->w[i] = h_weight(1, tiny, i);
    rv->a = rv->b = NULL;
    if (!is_target(p->which))
        return;
    char name[128];
    int len = (int)(strlen(p->name) - strlen(".weight"));
    rv->a = malloc((uint64_t)(LORA_RANK * p->cols) * sizeof(double));
    rv->b = malloc((uint64_t)(p->rows * LORA_RANK) * sizeof(double));
    snprintf(name, sizeof(name), "%.*s.lora_A.weight", len, p->name);
    for (uint64_t i = 0; i < (uint64_t)(LORA_RANK * p->cols); i++)
        rv->a[i] = h_factor_value(v, name, i);
    snprintf(name, sizeof(name), "%.*s.lora_B.weight", len, p->name);
    for (uint64_t i = 0; i < (uint64_t)(p->rows * LORA_RANK); i++)
        rv->b[i] = h_factor_value(v, name, i);
}

/* Compares the F32 weight buffer of worker pid (TP rank t of T) with version v's merged
 * weights W + s * B * A, computed here in double and laid out by the naive reference of
 * tests/unit/plan_ref.h, sharing no code with the planner or the executor. A merged element
 * must be within (r + 4) 2^-23 (|W| + |s| sum |B A terms|) of it (the executor's f32 sums,
 * as tests/unit/lora_case.h allows), every other one hold W's bits, padding zero. Returns
 * 0, 1 (the first mismatch printed) or 77 (the buffer cannot be read). */
static int check_lora_buffer(pid_t pid, uint32_t t, uint32_t T, uint64_t v)
{
    uint64_t have = 0, total = 0;
    float *got = h_worker_weights(pid, 0, &have);
    if (!got) {
        printf("worker %d: weight buffer 0 cannot be read: %s\n", (int)pid, strerror(errno));
        return 77;
    }
    rlb_model_config cfg = h_params()->cfg;
    ref_model m;
    ref_model_init(&m, &cfg, 0);
    ref_values *rv = calloc((size_t)m.n, sizeof(*rv));
    for (int i = 0; i < m.n; i++)
        ref_values_fill(&rv[i], &m.p[i], v);
    ref_tensor ts[3 + 7 * 8];
    int n = ref_tensors(&cfg, (int)T, sizeof(float), ts, &total), bad = total > have;
    double s = (double)LORA_ALPHA / LORA_RANK;
    for (int k = 0; k < n && !bad; k++)
        for (int64_t lr = 0; lr < ts[k].rows && !bad; lr++)
            for (int64_t lc = 0; lc < ts[k].cols && !bad; lc++) {
                float x = got[ts[k].offset / sizeof(float) + (uint64_t)(lr * ts[k].cols + lc)];
                uint32_t bits;
                memcpy(&bits, &x, sizeof(bits));
                int which;
                int64_t gr, gc;
                if (!ref_origin(&cfg, (int)T, (int)t, ts[k].kind, lr, lc, &which, &gr, &gc)) {
                    if (bits)
                        printf("worker %d (TP rank %u of %u): padding row %lld of tensor %d "
                               "is %g\n", (int)pid, t, T, (long long)lr, k, x);
                    bad = bits != 0;
                    continue;
                }
                int pi = m.idx[(ts[k].layer + 1) * P_KINDS + which];
                const ref_param *p = &m.p[pi];
                const ref_values *pv = &rv[pi];
                double w = pv->w[gr * p->cols + gc], want = w, tol = 0, sum = 0, mag = 0;
                for (int64_t j = 0; pv->a && j < LORA_RANK; j++) {
                    double term = pv->b[gr * LORA_RANK + j] * pv->a[j * p->cols + gc];
                    sum += term;
                    mag += fabs(term);
                }
                if (pv->a) {
                    want = w + s * sum;
                    tol = (double)(LORA_RANK + 4) * ldexp(fabs(w) + s * mag, -23);
                }
                if (!(fabs((double)x - want) <= tol)) {
                    printf("worker %d (TP rank %u of %u): %s[%lld, %lld] is %.9g, version %"
                           PRIu64 " has %.9g there (tol %.3g)\n", (int)pid, t, T, p->name,
                           (long long)gr, (long long)gc, x, v, want, tol);
                    bad = 1;
                }
            }
    for (int i = 0; i < m.n; i++) {
        free(rv[i].w);
        free(rv[i].a);
        free(rv[i].b);
    }
    free(rv);
    ref_model_free(&m);
    free(got);
    return bad;
}

/* Compares TP rank t's buffer with the reference of version v. Returns 0, 1 (mismatch,
 * printed) or 77 (cannot read it). */
static int check_worker(const char *sock, int t, uint64_t v, int rank, int lora)
{
    int T = 1;
    pid_t pid = find_worker(sock, t, &T);
    int rc = pid <= 0 ? 77
             : lora   ? check_lora_buffer(pid, (uint32_t)t, (uint32_t)T, v)
                      : h_check_buffer(pid, 0, (uint32_t)t, (uint32_t)T, v);
    if (rc == 77)
        printf("check unavailable: worker TP rank %d of %s: %s\n", t, sock,
               pid > 0 ? "its buffer cannot be read" : "not found");
    if (rc == 1)
        printf("MISMATCH rank %d: version %" PRIu64 ", worker TP rank %d of %d\n", rank, v, t,
               T);
    if (!rc && t + 1 < T)
        return check_worker(sock, t + 1, v, rank, lora);
    return rc;
}

/* Prints what this node's bridge received from other nodes so far and the bytes of base and
 * of factors that the ranks of other nodes hold (this node's ranks: first .. + n). */
static void print_bytes(const h_trainer *t, uint64_t v, uint32_t first, uint32_t n)
{
    uint64_t base = 0, factors = 0;
    for (uint32_t f = 0; f < t->world; f++) {
        if (f >= first && f < first + n)
            continue;
        for (int64_t p = 0; p < t->list->n; p++) {
            rlb_param_role role = t->list->params[p].role;
            uint64_t b = h_shard_bytes(t, p, f);
            if (role == RLB_ROLE_LORA_A || role == RLB_ROLE_LORA_B)
                factors += b;
            else
                base += b;
        }
    }
    printf("xnode bytes %" PRIu64 ": received %.0f, remote base %" PRIu64 ", remote factors %"
           PRIu64 "\n", v, h_stat(t->c, "xnode_bytes_received"), base, factors);
}

/* Kills this process with SIGKILL after `us` microseconds, from a helper process. */
static void die_after(int us)
{
    pid_t me = getpid();
    if (fork() == 0) {
        struct timespec ts = {0, (long)us * 1000};
        nanosleep(&ts, NULL);
        kill(me, SIGKILL);
        _exit(0);
    }
}

int main(int argc, char **argv)
{
    h_layout layout = H_FSDP2;
    uint64_t versions = 20;
    int check = 0, lora = 0, die_rank = -1, republish = 0, tries = 0;
    uint64_t die_v = 0;
    char die_when[16] = "";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--layout") && i + 1 < argc)
            layout = !strcmp(argv[++i], "fsdp1")   ? H_FSDP1
                     : !strcmp(argv[i], "split") ? H_SPLIT
                                                 : H_FSDP2;
        else if (!strcmp(argv[i], "--versions") && i + 1 < argc)
            versions = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--check"))
            check = 1;
        else if (!strcmp(argv[i], "--lora"))
            lora = 1;
        else if (!strcmp(argv[i], "--republish") && i + 1 < argc)
            republish = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--die") && i + 1 < argc &&
                 sscanf(argv[++i], "%d:%" SCNu64 ":%15s", &die_rank, &die_v, die_when) == 3)
            continue;
        else {
            fprintf(stderr, "xnode_trainer: bad argument '%s'\n", argv[i]);
            return 2;
        }
    }
    int rank = (int)env_int("RANK"), world = (int)env_int("WORLD_SIZE");
    int local = (int)env_int("LOCAL_RANK"), local_world = (int)env_int("LOCAL_WORLD_SIZE");
    int restart = getenv("TORCHELASTIC_RESTART_COUNT") ? atoi(getenv("TORCHELASTIC_RESTART_COUNT")) : 0;
    const char *dir = getenv("RLB_SOCKET_DIR");
    h_run r;
    memset(&r, 0, sizeof(r));
    snprintf(r.sock, sizeof(r.sock), "%s/bridge", dir ? dir : ".");
    h_trainer t;
    rlb_param_list with_adapters;
    int rc = lora ? lora_list(&with_adapters) : 0;
    if (rc == 0)
        rc = lora ? h_trainer_open_list(&r, &t, (uint32_t)rank, (uint32_t)world, layout,
                                        &with_adapters, h_lora_value)
                  : h_trainer_open(&r, &t, (uint32_t)rank, (uint32_t)world, layout);
    if (rc) {
        printf("rank %d: cannot register: %s\n", rank, rlb_strerror(rc));
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (uint64_t v = rlb_weight_version(t.c) + 1; v <= versions; v++) {
        h_trainer_fill(&t, v);
        if (rank == die_rank && v == die_v && restart == 0) {
            printf("rank %d: dying %s version %" PRIu64 "\n", rank, die_when, v);
            if (!strcmp(die_when, "before"))
                kill(getpid(), SIGKILL);
            if (!strcmp(die_when, "stall"))
                sleep(120);
            die_after(2000);
        }
        rlb_sync_stats st = {.struct_size = sizeof(st)};
        rc = rlb_publish(t.c, v, &st);
        if (rc) {
            printf("aborted %" PRIu64 ": %s\n", v, rlb_last_error(t.c));
            /* What an RL trainer does after an abort: publish the same weights again. */
            if (rc == RLB_EABORTED && tries++ < republish) {
                v--;
                continue;
            }
            return 3;
        }
        printf("synced %" PRIu64 " (%.2f ms)\n", v, st.ms);
        if (lora && check && local == 0)
            print_bytes(&t, v, (uint32_t)(rank - local), (uint32_t)local_world);
        if (check && local == 0 && (rc = check_worker(r.sock, 0, v, rank, lora)) != 0)
            return rc;
    }
    printf("done\n");
    h_trainer_close(&t);
    if (lora)
        rlb__params_free(&with_adapters);
    return 0;
}
