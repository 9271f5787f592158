/* bridge_harness.c: see bridge_harness.h. */
#include "tests/integration/bridge_harness.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/conn.h"
#include "model/config.h"
#include "model/params.h"
#include "model/safetensors.h"
#include "tests/integration/shm_own.h"
#include "tests/unit/plan_ref.h"
#include "worker/daemon.h"

#define H_ALIGN 4 /* FSDP1 use_orig_params alignment: 16 bytes of F32 */
#define H_UNIT_ENTRIES 128 /* room for one FSDP1 unit's entries: parameters, factors, padding */

const char *const h_lora_targets[H_LORA_TARGETS] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj",
};

/* /dev/shm entries this run's processes could have made (shm_own.h). */
static int count_dev_shm(const h_run *r)
{
    pid_t pids[1 + H_MAX_WORKERS] = {r->bridge};
    for (int i = 0; i < r->n_workers; i++)
        pids[1 + i] = r->workers[i];
    return shm_own_count(pids, 1 + r->n_workers);
}

static const rlb_param_list *tiny_params(void)
{
    static rlb_param_list list;
    static int done;
    if (!done) {
        rlb_model_config cfg;
        rlb__config_tiny(&cfg);
        rlb__params_init(&list, &cfg, NULL, 0);
        done = 1;
    }
    return &list;
}

/* The weights of version v: element i of parameter p. Norms stay near 1 so the model is
 * well-conditioned and greedy tokens vary with v. */
static float wval(uint64_t v, int64_t p, uint64_t i, int norm)
{
    uint64_t z = v * 0x9E3779B97F4A7C15ull + (uint64_t)p * 0xBF58476D1CE4E5B9ull + i;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(z >> 40) / (float)(1u << 24) - 0.5f;
    return norm ? 1.0f + 0.2f * u : 0.4f * u;
}

static int is_norm(const rlb_param *p)
{
    return p->role == RLB_ROLE_REPLICATED;
}

/* ---- Processes ----------------------------------------------------------------------- */

/* Every process the harness forked and the directories of the current runs (one per node),
 * so h_cleanup can end what a failed test (an assertion jumps out of it) left running. */
static pid_t spawned[64];
static int n_spawned;
static char run_dirs[4][128];
static int n_run_dirs;

/* Forks a process of the run. The child gets the default action back for the signals of a
 * crash: cmocka catches them in the test to fail the test at hand, and a forked bridge or
 * worker that crashed would otherwise jump back into the test runner and run the rest of the
 * tests itself. */
static pid_t spawn(void)
{
    static const int crash_signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS};
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0)
        for (size_t i = 0; i < sizeof(crash_signals) / sizeof(crash_signals[0]); i++)
            signal(crash_signals[i], SIG_DFL);
    if (pid > 0 && n_spawned < 64)
        spawned[n_spawned++] = pid;
    return pid;
}

int h_start_unpublished(h_run *r, h_trainer *t, rlb_sync_mode mode, uint32_t replicas,
                        uint32_t tp)
{
    if (h_start(r, mode) || h_workers(r, replicas, tp) || h_trainer_open(r, t, 0, 1, H_FSDP2) ||
        h_wait_workers(r, t->c, replicas * tp, replicas))
        return -1;
    return 0;
}

int h_start_simple(h_run *r, h_trainer *t, rlb_sync_mode mode, uint32_t replicas)
{
    if (h_start_unpublished(r, t, mode, replicas, 1))
        return -1;
    h_trainer_fill(t, 1);
    return rlb_publish(t->c, 1, NULL) == 0 ? 0 : -1;
}

int h_teardown(void **state)
{
    (void)state;
    h_cleanup();
    return 0;
}

void h_cleanup(void)
{
    for (int i = 0; i < n_spawned; i++)
        if (kill(spawned[i], SIGKILL) == 0)
            waitpid(spawned[i], NULL, 0);
    n_spawned = 0;
    for (int i = 0; i < n_run_dirs; i++) {
        char cmd[sizeof(run_dirs[0]) + 16];
        snprintf(cmd, sizeof(cmd), "rm -rf %.127s", run_dirs[i]);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", run_dirs[i]);
    }
    n_run_dirs = 0;
}

static int version_checkpoint(const char *dir, uint64_t v, char *tag);

/* Starts the bridge for cfg (NULL: the tiny model); base_version != 0: with that version's
 * checkpoint as its base; node (or NULL): as that node of a multi-node job. */
static int start_bridge(h_run *r, rlb_sync_mode mode, uint64_t base_version,
                        const rlb_model_config *cfg, const h_node *node)
{
    memset(r, 0, sizeof(*r));
    r->shm_before = count_dev_shm(r);
    snprintf(r->dir, sizeof(r->dir), "/tmp/rlb-bridge-test-XXXXXX");
    if (!mkdtemp(r->dir))
        return -1;
    if (n_run_dirs < 4)
        snprintf(run_dirs[n_run_dirs++], sizeof(run_dirs[0]), "%s", r->dir);
    snprintf(r->sock, sizeof(r->sock), "%s/bridge.sock", r->dir);
    char tag[32], base[192];
    if (base_version && version_checkpoint(r->dir, base_version, tag) != 0)
        return -1;
    snprintf(base, sizeof(base), "%s/%s", r->dir, base_version ? tag : "");
    r->bridge = spawn();
    if (r->bridge == 0) {
        static volatile sig_atomic_t stop;
        rlb__daemon_stop_on_signals(&stop);
        rlb_bridge_opts o = RLB_BRIDGE_OPTS_INIT;
        o.stop = &stop;
        o.socket_path = r->sock;
        o.mode = mode;
        o.threads = 2;
        /* Small rings: results of several records fragment (a test may ask for smaller
         * ones still through RLB_RING_BYTES). */
        o.ring_bytes = getenv("RLB_RING_BYTES") ? 0 : 1u << 20;
        o.base_dir = base_version ? base : NULL;
        if (node) {
            o.nnodes = node->nnodes;
            o.node_rank = node->node;
            o.first_rank = node->first_rank;
            o.n_ranks = node->n_ranks;
            o.store_addr = "127.0.0.1";
            o.store_port = node->store_port;
            o.run_id = node->run_id;
        }
        if (cfg)
            o.cfg = *cfg;
        else
            rlb__config_tiny(&o.cfg);
        _exit(rlb__bridge_run(&o) == 0 ? 0 : 1);
    }
    struct stat st;
    return h_wait_listening(r->sock, 10) == 0 && stat(r->sock, &st) == 0 ? 0 : -1;
}

int h_wait_listening(const char *path, double s)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    /* The socket file appears at bind(), a moment before listen(): only a connection
     * that goes through says the bridge takes peers. It closes at once, which the bridge
     * sees as a peer gone before its handshake. */
    for (double t0 = rlb__clock_s(); rlb__clock_s() - t0 < s; usleep(2000)) {
        int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        int ok = fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
        if (fd >= 0)
            close(fd);
        if (ok)
            return 0;
    }
    return -1;
}

int h_start(h_run *r, rlb_sync_mode mode)
{
    return start_bridge(r, mode, 0, NULL, NULL);
}

int h_start_base(h_run *r, rlb_sync_mode mode, uint64_t v)
{
    return start_bridge(r, mode, v, NULL, NULL);
}

int h_start_config(h_run *r, rlb_sync_mode mode, const rlb_model_config *cfg)
{
    return start_bridge(r, mode, 0, cfg, NULL);
}

float *h_worker_weights(pid_t pid, int buf, uint64_t *bytes)
{
    char path[64], line[512], name[32];
    snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
    snprintf(name, sizeof(name), "rlb-weights-%d", buf);
    FILE *f = fopen(path, "r");
    unsigned long lo = 0, hi = 0;
    while (f && fgets(line, sizeof(line), f))
        if (strstr(line, name) && sscanf(line, "%lx-%lx", &lo, &hi) == 2)
            break;
    if (f)
        fclose(f);
    if (hi <= lo) {
        errno = ENOENT;
        return NULL;
    }
    snprintf(path, sizeof(path), "/proc/%d/mem", (int)pid);
    int fd = open(path, O_RDONLY);
    float *data = malloc(hi - lo);
    ssize_t n = fd >= 0 && data ? pread(fd, data, hi - lo, (off_t)lo) : -1;
    int saved = errno;
    if (fd >= 0)
        close(fd);
    if (n != (ssize_t)(hi - lo)) {
        free(data);
        errno = saved ? saved : EIO;
        return NULL;
    }
    *bytes = hi - lo;
    return data;
}

int h_start_node(h_run *r, rlb_sync_mode mode, const h_node *node)
{
    return start_bridge(r, mode, 0, NULL, node);
}

rlb_device h_worker_device = RLB_DEVICE_CPU;

/* h_worker, loading checkpoint model_dir at start when it is not NULL. */
static pid_t spawn_worker(h_run *r, uint32_t replica, uint32_t replicas, uint32_t tp_rank,
                          uint32_t tp, const char *model_dir)
{
    if (r->n_workers == H_MAX_WORKERS)
        return -1;
    pid_t pid = spawn();
    if (pid == 0) {
        rlb_worker_opts o = RLB_WORKER_OPTS_INIT;
        o.socket_path = r->sock;
        o.model_dir = model_dir;
        o.replica = replica;
        o.replicas = replicas;
        o.tp_rank = tp_rank;
        o.tp_size = tp;
        o.kv_bytes = 4u << 20;
        o.threads = 1;
        o.device = h_worker_device;
        o.dtype = RLB_DTYPE_F32; /* the CPU's, so a GPU worker gives the CPU reference's tokens */
        _exit(rlb__worker_run(&o) == 0 ? 0 : 1);
    }
    if (pid > 0)
        r->workers[r->n_workers++] = pid;
    return pid;
}

pid_t h_worker(h_run *r, uint32_t replica, uint32_t replicas, uint32_t tp_rank, uint32_t tp)
{
    return spawn_worker(r, replica, replicas, tp_rank, tp, NULL);
}

/* Starts replicas x tp workers that load checkpoint model_dir (NULL: none). */
static int spawn_workers(h_run *r, uint32_t replicas, uint32_t tp, const char *model_dir)
{
    for (uint32_t d = 0; d < replicas; d++)
        for (uint32_t t = 0; t < tp; t++)
            if (spawn_worker(r, d, replicas, t, tp, model_dir) < 0)
                return -1;
    return 0;
}

int h_workers(h_run *r, uint32_t replicas, uint32_t tp)
{
    return spawn_workers(r, replicas, tp, NULL);
}

int h_workers_loaded(h_run *r, uint32_t replicas, uint32_t tp, uint64_t v)
{
    char tag[32], dir[256];
    if (version_checkpoint(r->dir, v, tag) != 0)
        return -1;
    snprintf(dir, sizeof(dir), "%s/%s", r->dir, tag);
    return spawn_workers(r, replicas, tp, dir);
}

double h_stat(rlb_client *c, const char *name)
{
    rlb_stat_list *l;
    double v = -1;
    if (rlb_bridge_stats(c, &l) != 0)
        return -1;
    if (rlb_stat_list_find(l, name, &v) != 0)
        v = -1;
    rlb_stat_list_free(l);
    return v;
}

int h_wait_stat(rlb_client *c, const char *name, double want, double s)
{
    for (double t0 = rlb__clock_s(); rlb__clock_s() - t0 < s; usleep(2000))
        if (h_stat(c, name) == want)
            return 0;
    double got = h_stat(c, name);
    if (got == want)
        return 0;
    fprintf(stderr, "bridge counter %s is %g, want %g\n", name, got, want);
    return -1;
}

int h_wait_workers(h_run *r, rlb_client *c, uint32_t workers, uint32_t up)
{
    (void)r;
    for (double t0 = rlb__clock_s(); rlb__clock_s() - t0 < 20; usleep(5000))
        if (h_stat(c, "workers") == workers && h_stat(c, "replicas_up") == up)
            return 0;
    return -1;
}

/* Waits up to `s` seconds for pid; kills it when it does not exit. Returns its status. */
static int reap(pid_t pid, double s)
{
    for (int i = 0; i < n_spawned; i++)
        if (spawned[i] == pid)
            spawned[i] = spawned[--n_spawned]; /* reaped below: never signal it again */
    int st = 0;
    for (double t0 = rlb__clock_s(); rlb__clock_s() - t0 < s; usleep(2000))
        if (waitpid(pid, &st, WNOHANG) == pid)
            return st;
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    return -1;
}

int h_reap_worker(h_run *r, int i, double s)
{
    int rc = reap(r->workers[i], s) < 0 ? -1 : 0;
    r->workers[i] = -1;
    return rc;
}

void h_kill_worker(h_run *r, int i)
{
    kill(r->workers[i], SIGKILL);
    h_reap_worker(r, i, 10);
}

int h_stop(h_run *r, rlb_client *tool)
{
    int ok = 0;
    if (tool) {
        /* No client call sends a shutdown: SIGTERM takes the same path. */
        rlb_close(tool);
    }
    kill(r->bridge, SIGTERM);
    if (reap(r->bridge, 10) != 0)
        ok = -1;
    for (int i = 0; i < r->n_workers; i++)
        if (r->workers[i] > 0)
            reap(r->workers[i], 10);
    struct stat st;
    if (stat(r->sock, &st) == 0) {
        fprintf(stderr, "socket file %s left behind\n", r->sock);
        ok = -1;
    }
    int after = count_dev_shm(r);
    if (after != r->shm_before) {
        fprintf(stderr, "/dev/shm held %d entries before, %d after\n", r->shm_before, after);
        ok = -1;
    }
    h_cleanup();
    return ok;
}

int h_connect(h_run *r, uint32_t rank, uint32_t world, rlb_client **out)
{
    rlb_client_options o;
    rlb_client_options_init(&o);
    o.socket = r->sock;
    o.rank = rank;
    o.world = world ? world : 1;
    o.observer = world == 0;
    o.request_timeout_ms = 20000;
    return rlb_connect(&o, out);
}

/* ---- Trainer shards ------------------------------------------------------------------ */

/* Rows [row0, row0 + rows) of parameter p that FSDP2 rank f of w holds. */
static void fsdp2_rows(const rlb_param *p, uint32_t f, uint32_t w, int64_t *row0, int64_t *rows)
{
    int64_t c = (p->rows + w - 1) / w;
    *row0 = f * c;
    *rows = *row0 >= p->rows ? 0 : (p->rows - *row0 < c ? p->rows - *row0 : c);
}

/* Unit u's FSDP1 flat layout of list l (model/params.h), aligned as use_orig_params does. */
static uint64_t flat_walk(const rlb_param_list *l, int u, uint32_t world, rlb_flat_piece_fn fn,
                          void *arg)
{
    return rlb__params_fsdp1_walk(l, u, H_ALIGN, world, fn, arg);
}

typedef struct flat_fill {
    const h_trainer *t; /* whose list and values */
    float *chunk;    /* this rank's chunk */
    uint64_t lo, hi; /* flat range of the chunk */
    uint64_t v;      /* version */
    rlb_fsdp1_entry *entries; /* when non-NULL: collect entries */
    uint32_t n;      /* entries collected */
    int64_t count_p; /* when >= 0: count the elements of this parameter inside the chunk */
    uint64_t count;
} flat_fill;

static void flat_cb(void *arg, int64_t p, uint64_t start, uint64_t numel)
{
    flat_fill *f = arg;
    const rlb_param_list *l = f->t->list;
    if (f->entries) {
        rlb_fsdp1_entry *e = &f->entries[f->n++];
        memset(e, 0, sizeof(*e));
        e->numel = numel;
        e->padding = p < 0;
        if (p >= 0) {
            const rlb_param *q = &l->params[p];
            e->name = q->name;
            e->ndim = (uint32_t)q->ndim;
            e->shape[0] = (uint64_t)q->rows;
            e->shape[1] = (uint64_t)q->cols;
        }
        return;
    }
    if (f->count_p >= 0) {
        uint64_t lo = start > f->lo ? start : f->lo, hi = start + numel < f->hi ? start + numel : f->hi;
        f->count += p == f->count_p && hi > lo ? hi - lo : 0;
        return;
    }
    for (uint64_t i = 0; i < numel; i++) {
        uint64_t g = start + i;
        if (g >= f->lo && g < f->hi)
            f->chunk[g - f->lo] = p < 0 ? 0.0f : f->t->value(f->v, l, p, i);
    }
}

/* H_SPLIT: the rank holding parameter p whole (an adapter's factors: its weight's). */
static uint32_t split_owner(const rlb_param_list *l, int64_t p, uint32_t world)
{
    for (int64_t k = 0; k < l->n_adapters; k++)
        if (l->adapters[k].a == p || l->adapters[k].b == p)
            p = l->adapters[k].base;
    return (uint32_t)(p % world);
}

/* Copies bytes at offset `at` of t's host memory to its device copy, where it has one.
 * Returns 0, or -1 after printing that the upload failed. */
static int upload(h_trainer *t, size_t at, size_t bytes)
{
    if (!t->dev_mem || t->dev->upload(t->dev_mem + at, t->mem + at, bytes) == 0)
        return 0;
    fprintf(stderr, "trainer rank %u: upload of %zu bytes to its device copy failed\n", t->rank,
            bytes);
    return -1;
}

/* Writes version v's weights into t's host memory. */
static void fill_host(h_trainer *t, uint64_t v)
{
    const rlb_param_list *l = t->list;
    float *out = (float *)t->mem;
    if (t->layout == H_SPLIT) {
        for (int64_t p = 0; p < l->n; p++) {
            if (split_owner(l, p, t->world) != t->rank)
                continue;
            uint64_t n = rlb__param_numel(&l->params[p]);
            for (uint64_t i = 0; i < n; i++)
                out[i] = t->value(v, l, p, i);
            out += (n + H_ALIGN - 1) / H_ALIGN * H_ALIGN;
        }
        return;
    }
    if (t->layout == H_FSDP2) {
        for (int64_t p = 0; p < l->n; p++) {
            int64_t row0, rows;
            fsdp2_rows(&l->params[p], t->rank, t->world, &row0, &rows);
            uint64_t n = (uint64_t)(rows * l->params[p].cols);
            for (uint64_t i = 0; i < n; i++)
                out[i] = t->value(v, l, p, (uint64_t)(row0 * l->params[p].cols) + i);
            out += (n + H_ALIGN - 1) / H_ALIGN * H_ALIGN;
        }
        return;
    }
    for (int u = 0; u <= (int)l->cfg.n_layers; u++) {
        uint64_t chunk = flat_walk(l, u, t->world, NULL, NULL) / t->world;
        flat_fill f = {.t = t, .chunk = out, .lo = t->rank * chunk,
                       .hi = (t->rank + 1) * chunk, .v = v, .count_p = -1};
        flat_walk(l, u, t->world, flat_cb, &f);
        out += (chunk + H_ALIGN - 1) / H_ALIGN * H_ALIGN;
    }
}

int h_trainer_fill(h_trainer *t, uint64_t v)
{
    fill_host(t, v);
    return upload(t, 0, t->bytes);
}

uint64_t h_shard_bytes(const h_trainer *t, int64_t p, uint32_t f)
{
    const rlb_param *q = &t->list->params[p];
    if (t->layout == H_SPLIT)
        return split_owner(t->list, p, t->world) == f ? rlb__param_numel(q) * sizeof(float) : 0;
    if (t->layout == H_FSDP2) {
        int64_t row0, rows;
        fsdp2_rows(q, f, t->world, &row0, &rows);
        return (uint64_t)(rows * q->cols) * sizeof(float);
    }
    int u = rlb__param_fsdp1_unit(q);
    uint64_t chunk = flat_walk(t->list, u, t->world, NULL, NULL) / t->world;
    flat_fill c = {.t = t, .lo = f * chunk, .hi = (f + 1) * chunk, .count_p = p};
    flat_walk(t->list, u, t->world, flat_cb, &c);
    return c.count * sizeof(float);
}

float h_weight_named(uint64_t v, const char *name, uint64_t elem)
{
    const rlb_param_list *l = tiny_params();
    for (int64_t p = 0; p < l->n; p++)
        if (!strcmp(l->params[p].name, name))
            return wval(v, p, elem, is_norm(&l->params[p]));
    return NAN;
}

int h_trainer_poison(h_trainer *t, const char *name, uint64_t elem, float value)
{
    const rlb_param_list *l = t->list;
    float *out = (float *)t->mem;
    for (int64_t p = 0; t->layout == H_FSDP2 && p < l->n; p++) {
        int64_t row0, rows;
        fsdp2_rows(&l->params[p], t->rank, t->world, &row0, &rows);
        uint64_t first = (uint64_t)(row0 * l->params[p].cols);
        uint64_t n = (uint64_t)(rows * l->params[p].cols);
        if (!strcmp(l->params[p].name, name)) {
            if (elem < first || elem - first >= n)
                return -1;
            out[elem - first] = value;
            return upload(t, (size_t)((uint8_t *)&out[elem - first] - t->mem), sizeof(float));
        }
        out += (n + H_ALIGN - 1) / H_ALIGN * H_ALIGN;
    }
    return -1;
}

int h_trainer_poison3(h_trainer *t)
{
    if (h_trainer_poison(t, "lm_head.weight", 5, __builtin_nanf("")) ||
        h_trainer_poison(t, "lm_head.weight", 6, -__builtin_inff()) ||
        h_trainer_poison(t, "model.norm.weight", 3, __builtin_inff()))
        return -1;
    return 0;
}

int h_poison3_named(const char *why)
{
    fprintf(stderr, "abort: %s\n", why);
    return strstr(why, "3 non-finite") && strstr(why, "lm_head.weight: 2") &&
                   strstr(why, "model.norm.weight: 1")
               ? 0
               : -1;
}

int (*h_alloc)(rlb_client *c, size_t bytes, void **ptr) = rlb_alloc_host;

const h_dev_ops *h_trainer_dev = NULL;

/* The tiny model's weights of version v (wval). */
static float tiny_value(uint64_t v, const rlb_param_list *l, int64_t p, uint64_t i)
{
    return wval(v, p, i, is_norm(&l->params[p]));
}

int h_trainer_open(h_run *r, h_trainer *t, uint32_t rank, uint32_t world, h_layout layout)
{
    return h_trainer_open_list(r, t, rank, world, layout, tiny_params(), tiny_value);
}

/* Declares the list's LoRA adapters for t's rank. Returns 0 or the client's error. */
static int declare_adapters(h_trainer *t)
{
    const rlb_param_list *l = t->list;
    if (l->n_adapters == 0)
        return 0;
    rlb_lora_desc *d = calloc((size_t)l->n_adapters, sizeof(*d));
    if (!d)
        return RLB_ENOMEM;
    size_t n = 0;
    for (int64_t k = 0; k < l->n_adapters; k++) {
        const rlb_param_adapter *a = &l->adapters[k];
        if (t->layout == H_SPLIT && split_owner(l, a->base, t->world) != t->rank)
            continue; /* another rank registers its factors */
        rlb_lora_desc_init(&d[n]);
        d[n].target = l->params[a->base].name;
        d[n].rank = (uint32_t)a->rank;
        d[n].alpha = a->scale * (float)a->rank;
        n++;
    }
    int rc = n ? rlb_register_lora(t->c, d, n) : 0;
    if (rc)
        fprintf(stderr, "register_lora: %s\n", rlb_last_error(t->c));
    free(d);
    return rc;
}

int h_trainer_open_list(h_run *r, h_trainer *t, uint32_t rank, uint32_t world, h_layout layout,
                        const rlb_param_list *l, h_value_fn value)
{
    memset(t, 0, sizeof(*t));
    t->rank = rank;
    t->world = world;
    t->layout = layout;
    t->list = l;
    t->value = value;
    int rc = h_connect(r, rank, world, &t->c);
    if (rc || (rc = declare_adapters(t)))
        return rc;
    uint32_t n_units = (uint32_t)l->cfg.n_layers + 1;
    uint32_t n = layout == H_FSDP1 ? n_units : (uint32_t)l->n;
    rlb_tensor_desc *d = calloc(n, sizeof(*d));
    rlb_fsdp1_entry *entries = calloc(n_units * H_UNIT_ENTRIES, sizeof(*entries));
    uint64_t floats = 0;
    for (uint32_t k = 0; k < n; k++) {
        rlb_tensor_desc_init(&d[k]);
        d[k].dtype = RLB_DTYPE_F32;
        d[k].shard_rank = rank;
        d[k].shard_world = world;
        if (layout == H_SPLIT) {
            const rlb_param *p = &l->params[k];
            d[k].name = p->name;
            d[k].layout = RLB_TENSOR_FULL;
            d[k].shard_rank = 0;
            d[k].shard_world = 1;
            d[k].ndim = (uint32_t)p->ndim;
            d[k].shape[0] = (uint64_t)p->rows;
            d[k].shape[1] = (uint64_t)p->cols;
            if (split_owner(l, (int64_t)k, world) == rank)
                floats += (rlb__param_numel(p) + H_ALIGN - 1) / H_ALIGN * H_ALIGN;
        } else if (layout == H_FSDP2) {
            const rlb_param *p = &l->params[k];
            int64_t row0, rows;
            fsdp2_rows(p, rank, world, &row0, &rows);
            d[k].name = p->name;
            d[k].layout = RLB_TENSOR_FSDP2;
            d[k].ndim = (uint32_t)p->ndim;
            d[k].shape[0] = (uint64_t)p->rows;
            d[k].shape[1] = (uint64_t)p->cols;
            floats += (uint64_t)((rows * p->cols + H_ALIGN - 1) / H_ALIGN * H_ALIGN);
        } else {
            static char names[64][16];
            uint64_t total = flat_walk(l, (int)k, world, NULL, NULL);
            flat_fill f = {.t = t, .entries = entries + H_UNIT_ENTRIES * k, .count_p = -1};
            flat_walk(l, (int)k, world, flat_cb, &f);
            snprintf(names[k], sizeof(names[k]), "unit%u", k);
            d[k].name = names[k];
            d[k].layout = RLB_TENSOR_FSDP1;
            d[k].ndim = 1;
            d[k].shape[0] = total;
            d[k].unit = k;
            d[k].align = H_ALIGN;
            d[k].n_entries = f.n;
            d[k].entries = f.entries;
            floats += (total / world + H_ALIGN - 1) / H_ALIGN * H_ALIGN;
        }
    }
    if (layout == H_SPLIT) { /* only the tensors this rank holds */
        uint32_t kept = 0;
        for (uint32_t k = 0; k < n; k++)
            if (split_owner(l, (int64_t)k, world) == rank)
                d[kept++] = d[k];
        n = kept;
    }
    t->bytes = floats * sizeof(float);
    rc = h_alloc(t->c, t->bytes + sizeof(float), (void **)&t->mem);
    if (rc == 0 && h_trainer_dev) {
        /* The tensors live in a device copy of the host memory, at the same offsets. */
        if (h_trainer_dev->alloc(t->bytes + sizeof(float), (void **)&t->dev_mem) == 0)
            t->dev = h_trainer_dev;
        else
            rc = RLB_ENOMEM;
    }
    uint8_t *base = t->dev_mem ? t->dev_mem : t->mem;
    for (uint32_t k = 0, at = 0; rc == 0 && k < n; k++) {
        uint64_t bytes;
        d[k].data = base + at;
        if (t->dev_mem) {
            d[k].device = RLB_DEVICE_CUDA;
            d[k].cuda_device = 0;
        }
        rlb_tensor_bytes(&d[k], &bytes);
        at += (uint32_t)((bytes / 4 + H_ALIGN - 1) / H_ALIGN * H_ALIGN * 4);
        if (bytes == 0)
            d[k].data = base; /* an empty shard still names memory */
    }
    if (rc == 0 && h_trainer_fill(t, 1) != 0)
        rc = RLB_ECUDA;
    if (rc == 0) {
        rc = rlb_register(t->c, d, n);
        if (rc)
            fprintf(stderr, "register: %s\n", rlb_last_error(t->c));
    }
    free(d);
    free(entries);
    return rc;
}

void h_trainer_close(h_trainer *t)
{
    /* The bridge has closed its mappings of the device copy once the unregister returned
     * (or it is gone, and with it the mappings). */
    if (t->dev_mem)
        rlb_unregister(t->c, NULL, 0);
    rlb_close(t->c);
    t->c = NULL;
    if (t->dev_mem)
        t->dev->free(t->dev_mem);
    t->dev_mem = NULL;
}

/* ---- Trainer rank in a child process ----------------------------------------------------- */

int h_child_start(h_run *r, h_child *ch, uint32_t rank, uint32_t world, h_layout layout)
{
    return h_child_start_list(r, ch, rank, world, layout, tiny_params(), tiny_value);
}

int h_child_start_list(h_run *r, h_child *ch, uint32_t rank, uint32_t world, h_layout layout,
                       const struct rlb_param_list *list, h_value_fn value)
{
    int to[2], from[2];
    if (pipe(to) || pipe(from))
        return -1;
    ch->pid = spawn();
    if (ch->pid == 0) {
        close(to[1]);
        close(from[0]);
        h_trainer t;
        int rc = h_trainer_open_list(r, &t, rank, world, layout, list, value);
        if (write(from[1], &rc, sizeof(rc)) != sizeof(rc) || rc)
            _exit(1);
        uint64_t v;
        while (read(to[0], &v, sizeof(v)) == sizeof(v) && v) {
            rc = h_trainer_fill(&t, v) == 0 ? rlb_publish(t.c, v, NULL) : RLB_ECUDA;
            if (write(from[1], &rc, sizeof(rc)) != sizeof(rc))
                break;
        }
        h_trainer_close(&t);
        _exit(0);
    }
    close(to[0]);
    close(from[1]);
    ch->to = to[1];
    ch->from = from[0];
    int rc;
    return ch->pid > 0 && h_child_result(ch, &rc) == 0 && rc == 0 ? 0 : -1;
}

int h_child_publish(h_child *ch, uint64_t v)
{
    return write(ch->to, &v, sizeof(v)) == sizeof(v) ? 0 : -1;
}

int h_child_result(h_child *ch, int *rc)
{
    struct pollfd p = {.fd = ch->from, .events = POLLIN};
    if (poll(&p, 1, 20000) != 1)
        return -1;
    return read(ch->from, rc, sizeof(*rc)) == sizeof(*rc) ? 0 : -1;
}

void h_child_stop(h_child *ch)
{
    uint64_t zero = 0;
    if (write(ch->to, &zero, sizeof(zero)) < 0)
        kill(ch->pid, SIGKILL);
    close(ch->to);
    close(ch->from);
    reap(ch->pid, 10);
}

/* ---- Reference ---------------------------------------------------------------------- */

static const char *tiny_config_json =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", "
    "\"hidden_size\": 64, \"intermediate_size\": 192, \"num_attention_heads\": 4, "
    "\"num_key_value_heads\": 2, \"head_dim\": 16, \"num_hidden_layers\": 2, "
    "\"vocab_size\": 250, \"max_position_embeddings\": 512, \"rms_norm_eps\": 1e-05, "
    "\"rope_theta\": 10000.0, \"tie_word_embeddings\": false, \"hidden_act\": \"silu\", "
    "\"torch_dtype\": \"float32\"}\n";

/* Writes the weights data[p] (every parameter of the tiny model) as DIR/<tag>/
 * (config.json + model.safetensors). */
static int write_checkpoint(const char *dir, const char *tag, float *const *data)
{
    const rlb_param_list *l = tiny_params();
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", dir, tag);
    if (mkdir(path, 0700) != 0 && errno != EEXIST)
        return -1;
    rlb_st_write_tensor *ts = calloc((size_t)l->n, sizeof(*ts));
    int64_t(*shapes)[2] = calloc((size_t)l->n, sizeof(*shapes));
    int rc = -1;
    for (int64_t p = 0; p < l->n; p++) {
        const rlb_param *q = &l->params[p];
        shapes[p][0] = q->rows;
        shapes[p][1] = q->cols;
        ts[p] = (rlb_st_write_tensor){.name = q->name, .dtype = RLB_DTYPE_F32, .ndim = q->ndim,
                                      .shape = shapes[p], .data = data[p]};
    }
    char file[300];
    snprintf(file, sizeof(file), "%s/model.safetensors", path);
    if (rlb__st_write(file, ts, (size_t)l->n, NULL, 0) == 0) {
        snprintf(file, sizeof(file), "%s/config.json", path);
        FILE *f = fopen(file, "w");
        if (f) {
            rc = fputs(tiny_config_json, f) < 0 ? -1 : 0;
            fclose(f);
        }
    }
    free(shapes);
    free(ts);
    return rc;
}

const rlb_param_list *h_params(void)
{
    return tiny_params();
}

float h_weight(uint64_t v, int64_t p, uint64_t i)
{
    return wval(v, p, i, is_norm(&tiny_params()->params[p]));
}

/* Greedy tokens of `rlb generate --tp tp` on checkpoint DIR/<tag>, which the caller wrote
 * (or that exists already). */
static int generate_ref(h_run *r, const char *tag, uint32_t tp, const int32_t *prompt,
                        uint32_t n, uint32_t max_tokens, int32_t *tokens, int cap)
{
    char ckpt[256];
    snprintf(ckpt, sizeof(ckpt), "%s/%s", r->dir, tag);
    char cmd[1024];
    int at = snprintf(cmd, sizeof(cmd), "%s generate --model %s --max-tokens %u --temperature "
                      "0 --tp %u --threads 1 --device cpu --prompt-ids ", RLB_BIN, ckpt, max_tokens, tp);
    for (uint32_t i = 0; i < n; i++)
        at += snprintf(cmd + at, sizeof(cmd) - (size_t)at, "%s%d", i ? "," : "", prompt[i]);
    FILE *f = popen(cmd, "r");
    if (!f)
        return -1;
    char line[8192];
    int count = -1;
    if (fgets(line, sizeof(line), f)) {
        char *s = strstr(line, "\"tokens\": [");
        if (s) {
            s += strlen("\"tokens\": [");
            count = 0;
            while (*s && *s != ']' && count < cap) {
                tokens[count++] = (int32_t)strtol(s, &s, 10);
                while (*s == ',' || *s == ' ')
                    s++;
            }
        }
    }
    return pclose(f) == 0 ? count : -1;
}

/* ---- Generation ---------------------------------------------------------------------- */

void h_request_greedy(h_request *q, const int32_t *prompt, uint32_t n, uint32_t max_tokens)
{
    rlb_sampling_params_init(&q->sp);
    q->sp.temperature = 0;
    q->sp.max_tokens = max_tokens;
    q->prompt = (rlb_prompt){prompt, n};
    rlb_generate_request_init(&q->req);
    q->req.prompts = &q->prompt;
    q->req.n_prompts = 1;
    q->req.sampling = &q->sp;
}

int h_submit(rlb_client *c, const int32_t *prompt, uint32_t n, uint32_t max_tokens,
             uint64_t min_version, rlb_ticket *ticket)
{
    h_request q;
    h_request_greedy(&q, prompt, n, max_tokens);
    q.req.min_weight_version = min_version;
    return rlb_generate_submit(c, &q.req, ticket);
}

int h_generate(rlb_client *c, const int32_t *prompt, uint32_t n, uint32_t max_tokens,
               rlb_result **out)
{
    rlb_ticket t;
    int rc = h_submit(c, prompt, n, max_tokens, 0, &t);
    return rc ? rc : rlb_generate_wait(c, t, 20000, out);
}

int h_greedy(rlb_client *c, uint64_t v, const int32_t *prompt, uint32_t n,
             uint32_t max_tokens, int32_t *tokens, int cap)
{
    rlb_result *res = NULL;
    if (h_generate(c, prompt, n, max_tokens, &res)) {
        fprintf(stderr, "generate: %s\n", rlb_last_error(c));
        return -1;
    }
    const rlb_sample *s = rlb_result_num_samples(res) == 1 ? rlb_result_sample(res, 0) : NULL;
    int count = s && s->weight_version == v && (int)s->n_tokens <= cap ? (int)s->n_tokens : -1;
    if (count > 0)
        memcpy(tokens, s->tokens, sizeof(int32_t) * (size_t)count);
    if (count < 0)
        fprintf(stderr, "generate: %s for version %llu\n", s ? "another version, or too many "
                "tokens" : "not one sample", (unsigned long long)v);
    rlb_result_free(res);
    return count;
}

int h_check_result(h_run *r, const rlb_result *res, uint64_t v, uint32_t tp,
                   const int32_t *prompt, uint32_t n, uint32_t max_tokens)
{
    const rlb_sample *s = rlb_result_num_samples(res) == 1 ? rlb_result_sample(res, 0) : NULL;
    if (!s || s->weight_version != v) {
        fprintf(stderr, "generate: %s for version %llu\n", s ? "another version" : "not one "
                "sample", (unsigned long long)v);
        return -1;
    }
    int32_t want[1024];
    int nw = h_reference(r, v, tp, prompt, n, max_tokens, want, 1024);
    if (nw < 0 || nw != (int)s->n_tokens || memcmp(want, s->tokens, sizeof(int32_t) * (size_t)nw)) {
        fprintf(stderr, "generate: tokens differ from the reference for version %llu\n",
                (unsigned long long)v);
        return -1;
    }
    return 0;
}

int h_check_greedy(h_run *r, rlb_client *c, uint64_t v, uint32_t tp, const int32_t *prompt,
                   uint32_t n, uint32_t max_tokens)
{
    rlb_result *res = NULL;
    if (h_generate(c, prompt, n, max_tokens, &res)) {
        fprintf(stderr, "generate: %s\n", rlb_last_error(c));
        return -1;
    }
    int rc = h_check_result(r, res, v, tp, prompt, n, max_tokens);
    rlb_result_free(res);
    return rc;
}

int h_reference_weights(h_run *r, const char *tag, float *const *data, uint32_t tp,
                        const int32_t *prompt, uint32_t n, uint32_t max_tokens,
                        int32_t *tokens, int cap)
{
    char ckpt[256];
    snprintf(ckpt, sizeof(ckpt), "%s/%s", r->dir, tag);
    struct stat st;
    if (stat(ckpt, &st) != 0 && write_checkpoint(r->dir, tag, data) != 0)
        return -1;
    return generate_ref(r, tag, tp, prompt, n, max_tokens, tokens, cap);
}

/* Writes version v's weights as DIR/ckpt<v> unless it is there; its tag goes to tag[32]. */
static int version_checkpoint(const char *dir, uint64_t v, char *tag)
{
    const rlb_param_list *l = tiny_params();
    snprintf(tag, 32, "ckpt%llu", (unsigned long long)v);
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", dir, tag);
    struct stat st;
    if (stat(path, &st) == 0)
        return 0;
    float **data = calloc((size_t)l->n, sizeof(*data));
    for (int64_t p = 0; p < l->n; p++) {
        uint64_t numel = rlb__param_numel(&l->params[p]);
        data[p] = malloc(numel * sizeof(float));
        for (uint64_t i = 0; i < numel; i++)
            data[p][i] = h_weight(v, p, i);
    }
    int rc = write_checkpoint(dir, tag, data);
    for (int64_t p = 0; p < l->n; p++)
        free(data[p]);
    free(data);
    return rc;
}

int h_reference(h_run *r, uint64_t v, uint32_t tp, const int32_t *prompt, uint32_t n,
                uint32_t max_tokens, int32_t *tokens, int cap)
{
    char tag[32];
    if (version_checkpoint(r->dir, v, tag) != 0)
        return -1;
    return generate_ref(r, tag, tp, prompt, n, max_tokens, tokens, cap);
}

/* ---- Worker buffers ------------------------------------------------------------------ */

#define H_MAX_TENSORS 64

float *h_buffer_image(uint32_t t, uint32_t T, uint64_t v, uint64_t *bytes)
{
    rlb_model_config cfg;
    rlb__config_tiny(&cfg);
    ref_tensor ts[H_MAX_TENSORS];
    int n = ref_tensors(&cfg, (int)T, sizeof(float), ts, bytes);
    float *img = calloc(1, *bytes);
    if (!img)
        return NULL;
    ref_model m;
    ref_model_init(&m, &cfg, 0);
    for (int k = 0; k < n; k++)
        for (int64_t r = 0; r < ts[k].rows; r++)
            for (int64_t c = 0; c < ts[k].cols; c++) {
                int which;
                int64_t grow, gcol;
                if (!ref_origin(&cfg, (int)T, (int)t, ts[k].kind, r, c, &which, &grow, &gcol))
                    continue;
                const ref_param *p = &m.p[m.idx[(ts[k].layer + 1) * P_KINDS + which]];
                img[ts[k].offset / sizeof(float) + (uint64_t)(r * ts[k].cols + c)] =
                    h_weight_named(v, p->name, (uint64_t)(grow * p->cols + gcol));
            }
    ref_model_free(&m);
    return img;
}

int h_check_buffer(pid_t pid, int buf, uint32_t t, uint32_t T, uint64_t v)
{
    uint64_t have = 0, want = 0;
    float *got = h_worker_weights(pid, buf, &have);
    if (!got) {
        printf("worker %d: weight buffer %d cannot be read: %s\n", (int)pid, buf,
               strerror(errno));
        return 77;
    }
    float *img = h_buffer_image(t, T, v, &want);
    int bad = !img || want > have;
    for (uint64_t i = 0; !bad && i < want / sizeof(float); i++)
        if (memcmp(&got[i], &img[i], sizeof(float))) {
            printf("worker %d (TP rank %u of %u), weight buffer %d: element %llu is %g, "
                   "version %llu has %g there\n", (int)pid, t, T, buf, (unsigned long long)i,
                   got[i], (unsigned long long)v, img[i]);
            bad = 1;
        }
    free(img);
    free(got);
    return bad;
}

/* ---- Raw protocol ------------------------------------------------------------------- */

/* Packs and sends m on c, then decodes one reply into its type and ERROR code. */
static int raw_roundtrip(rlb_conn *c, rlb_ring_rx *rx, const rlb_msg *m, int *code)
{
    uint8_t buf[4096];
    size_t len;
    rlb_ring_msg rm;
    rlb_msg reply;
    if (rlb__msg_pack(m, buf, sizeof(buf), &len) < 0 ||
        rlb__ring_send(rlb__conn_tx(c), m->type, buf, len, 2000) < 0 ||
        rlb__ring_recv(rlb__conn_rx(c), rx, 5000, &rm) < 0)
        return -1;
    int type = -1;
    if (rlb__msg_decode(rm.data, rm.len, &reply, NULL, 0) == 0) {
        type = (int)reply.type;
        if (code)
            *code = reply.type == RLB_MSG_ERROR ? reply.error.code : 0;
        rlb__msg_free(&reply);
    }
    rlb__ring_recv_done(rlb__conn_rx(c), rx);
    return type;
}

int h_raw_tool(h_run *r, const rlb_msg *m, int *code)
{
    rlb_conn *c;
    rlb_ring_rx rx = {.max_msg = 1 << 20};
    if (rlb__conn_connect(r->sock, 5000, &c) < 0)
        return -1;
    rlb_msg hello = {.type = RLB_MSG_HELLO,
                     .hello = {.abi_version = RLB_ABI_VERSION, .role = RLB_ROLE_TOOL}};
    int type = raw_roundtrip(c, &rx, &hello, NULL);
    if (type == RLB_MSG_WELCOME)
        type = raw_roundtrip(c, &rx, m, code);
    else
        type = -1;
    rlb__ring_rx_free(&rx);
    rlb__conn_close(c);
    return type;
}

/* ---- LoRA trainers' values ------------------------------------------------------------- */

float h_factor_value(uint64_t v, const char *name, uint64_t i)
{
    uint64_t z = UINT64_C(0xcbf29ce484222325);
    for (const char *c = name; *c; c++)
        z = (z ^ (uint8_t)*c) * UINT64_C(0x100000001b3);
    z ^= v * UINT64_C(0x9E3779B97F4A7C15) + i * UINT64_C(0xD1B54A32D192ED03);
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    z ^= z >> 31;
    return ((float)(z >> 40) / (float)(1u << 24) - 0.5f) * 0.5f;
}

float h_lora_value(uint64_t v, const rlb_param_list *l, int64_t p, uint64_t i)
{
    const rlb_param *q = &l->params[p];
    if (q->role == RLB_ROLE_LORA_A || q->role == RLB_ROLE_LORA_B)
        return h_factor_value(v, q->name, i);
    return h_weight(1, p, i);
}
