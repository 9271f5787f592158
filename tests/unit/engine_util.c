/* engine_util.c: fixture reading and the forked TP runner of the engine tests (see
 * engine_util.h). */
#include "tests/unit/engine_util.h"

#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHILD_DEADLINE_S 90     /* a child rank still running after this is killed */
#define TP_SLOT_FLOATS 65536    /* floats per shared-memory exchange slot */

const char *fx_dir(const char *name)
{
    static char path[1024];
    snprintf(path, sizeof path, "%s/%s", RLB_FIXTURES_DIR, name);
    return path;
}

static int read_ids(json_t *arr, int32_t *ids, int64_t *n)
{
    if (!json_is_array(arr) || json_array_size(arr) > FX_MAX_IDS)
        return -1;
    *n = (int64_t)json_array_size(arr);
    for (int64_t i = 0; i < *n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(arr, (size_t)i));
    return 0;
}

static float *read_floats(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    float *buf = len > 0 ? malloc((size_t)len) : NULL;
    if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *n = buf ? (size_t)len / sizeof(float) : 0;
    return buf;
}

int fx_load(const char *name, fixture *fx)
{
    memset(fx, 0, sizeof *fx);
    snprintf(fx->dir, sizeof fx->dir, "%s", fx_dir(name));
    char path[1200];
    snprintf(path, sizeof path, "%s/reference.json", fx->dir);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        fprintf(stderr, "%s: %s\n", path, jerr.text);
        return -1;
    }
    size_t n_logits = 0;
    snprintf(path, sizeof path, "%s/logits.f32", fx->dir);
    fx->all_logits = read_floats(path, &n_logits);
    fx->vocab = json_integer_value(json_object_get(root, "vocab"));
    json_t *prompts = json_object_get(root, "prompts");
    int rc = fx->all_logits && fx->vocab > 0 && json_is_array(prompts) &&
                     json_array_size(prompts) <= FX_MAX_PROMPTS
                 ? 0
                 : -1;
    for (size_t i = 0; rc == 0 && i < json_array_size(prompts); i++) {
        json_t *p = json_array_get(prompts, i);
        fx_prompt *fp = &fx->prompts[fx->n_prompts++];
        int64_t off = json_integer_value(json_object_get(p, "logits_offset"));
        fp->logits_rows = json_integer_value(json_object_get(p, "logits_rows"));
        if (read_ids(json_object_get(p, "ids"), fp->ids, &fp->n_ids) ||
            read_ids(json_object_get(p, "greedy"), fp->greedy, &fp->n_greedy) ||
            fp->logits_rows != fp->n_ids + fp->n_greedy || off < 0 ||
            (size_t)(off + fp->logits_rows * fx->vocab) > n_logits)
            rc = -1;
        else
            fp->logits = fx->all_logits + off;
    }
    json_decref(root);
    if (rc) {
        fprintf(stderr, "%s: malformed fixture\n", fx->dir);
        fx_free(fx);
    }
    return rc;
}

int fx_load_bf16(const fixture *fx, fx_bf16 *b)
{
    memset(b, 0, sizeof *b);
    char path[1200];
    snprintf(path, sizeof path, "%s/reference_bf16.json", fx->dir);
    FILE *probe = fopen(path, "r");
    if (!probe)
        return 1;
    fclose(probe);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        fprintf(stderr, "%s: %s\n", path, jerr.text);
        return -1;
    }
    size_t n_logits = 0, want = 0;
    snprintf(path, sizeof path, "%s/logits_bf16.f32", fx->dir);
    b->all_logits = read_floats(path, &n_logits);
    for (int i = 0; i < fx->n_prompts; i++)
        want += (size_t)(fx->prompts[i].logits_rows * fx->vocab);
    b->yardstick = json_real_value(json_object_get(root, "hf_bf16_vs_fp32_max_abs"));
    json_t *prompts = json_object_get(root, "prompts");
    int rc = b->all_logits && n_logits == want && b->yardstick > 0 && json_is_array(prompts) &&
                     json_array_size(prompts) == (size_t)fx->n_prompts
                 ? 0
                 : -1;
    for (int i = 0; rc == 0 && i < fx->n_prompts; i++) {
        rc = read_ids(json_object_get(json_array_get(prompts, (size_t)i), "greedy_bf16"),
                      b->greedy[i], &b->n_greedy[i]);
        b->logits[i] = b->all_logits + (fx->prompts[i].logits - fx->all_logits);
    }
    json_decref(root);
    if (rc) {
        fprintf(stderr, "%s: malformed bf16 fixture\n", fx->dir);
        free(b->all_logits);
        b->all_logits = NULL;
    }
    return rc;
}

void fx_free(fixture *fx)
{
    free(fx->all_logits);
    fx->all_logits = NULL;
}

double rel_err(const float *a, const float *ref, int64_t n)
{
    double scale = 1.0, worst = 0.0;
    for (int64_t i = 0; i < n; i++)
        if (fabs(ref[i]) > scale)
            scale = fabs(ref[i]);
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)ref[i]);
        if (!(d <= worst)) /* NaN counts as the worst */
            worst = isnan(d) ? INFINITY : d;
    }
    return worst / scale;
}

int engine_run_all(rlb_engine *e)
{
    while (rlb__engine_busy(e)) {
        int rc = rlb__engine_step(e);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static size_t out_span(size_t out_bytes)
{
    return (out_bytes + 63) / 64 * 64;
}

void *tp_out(void *outs, int r, size_t out_bytes)
{
    return (char *)outs + out_span(out_bytes) * (size_t)r;
}

void tp_outs_free(void *outs, int T, size_t out_bytes)
{
    if (outs)
        munmap(outs, out_span(out_bytes) * (size_t)T);
}

/* Waits for every child until the deadline, then kills the rest. Returns 0 when all
 * exited with status 0. */
static int reap(const pid_t *pids, int n)
{
    int ok = 1, left = n;
    int done[16] = {0};
    time_t deadline = time(NULL) + CHILD_DEADLINE_S;
    while (left > 0) {
        for (int i = 0; i < n; i++) {
            int st;
            if (done[i] || waitpid(pids[i], &st, WNOHANG) != pids[i])
                continue;
            done[i] = 1;
            left--;
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                fprintf(stderr, "tp rank %d: %s %d\n", i + 1,
                        WIFEXITED(st) ? "exit status" : "signal",
                        WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
                ok = 0;
            }
        }
        if (left > 0 && time(NULL) > deadline) {
            for (int i = 0; i < n; i++)
                if (!done[i]) {
                    fprintf(stderr, "tp rank %d: hung, killed\n", i + 1);
                    kill(pids[i], SIGKILL);
                    waitpid(pids[i], NULL, 0);
                }
            return -1;
        }
        if (left > 0)
            usleep(2000);
    }
    return ok ? 0 : -1;
}

int tp_run(int T, tp_rank_fn fn, void *arg, size_t out_bytes, void **outs)
{
    size_t span = out_span(out_bytes);
    *outs = NULL;
    if (T < 1 || T > 16)
        return -1;
    char *area = mmap(NULL, span * (size_t)T, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED)
        return -1;
    rlb_tp_comm *comm = NULL;
    if (T == 1) {
        int rc = rlb__tp_comm_local(&comm) ? -1 : fn(0, comm, arg, area);
        rlb__tp_comm_destroy(comm);
        if (rc) {
            tp_outs_free(area, T, out_bytes);
            return -1;
        }
        *outs = area;
        return 0;
    }
    size_t len = rlb__tp_shm_memsize(T, TP_SLOT_FLOATS);
    void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED || rlb__tp_shm_init(mem, len, T, TP_SLOT_FLOATS)) {
        if (mem != MAP_FAILED)
            munmap(mem, len);
        tp_outs_free(area, T, out_bytes);
        return -1;
    }
    pid_t pids[16];
    int n_children = 0, rc = 0;
    for (int r = 1; r < T; r++) {
        pid_t pid = fork();
        if (pid == 0) {
            int crc = rlb__tp_comm_shm_attach(mem, len, r, TP_TIMEOUT_MS, &comm);
            if (crc == 0)
                crc = fn(r, comm, arg, area + span * (size_t)r);
            rlb__tp_comm_destroy(comm);
            _exit(crc ? 1 : 0);
        }
        if (pid < 0) {
            rc = -1;
            break;
        }
        pids[n_children++] = pid;
    }
    if (rc == 0) {
        rc = rlb__tp_comm_shm_attach(mem, len, 0, TP_TIMEOUT_MS, &comm);
        if (rc == 0)
            rc = fn(0, comm, arg, area);
        rlb__tp_comm_destroy(comm);
    }
    if (reap(pids, n_children))
        rc = -1;
    munmap(mem, len);
    if (rc) {
        tp_outs_free(area, T, out_bytes);
        return -1;
    }
    *outs = area;
    return 0;
}
