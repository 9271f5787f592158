/* test_engine_generate: the `rlb generate` command, run as a separate process on the HF
 * fixtures:
 *   - greedy output (--temperature 0) is HF's greedy continuation from reference.json, for
 *     both fixtures and prompts at TP 1 and for llama_gqa at TP 2 and 4 (forked ranks);
 *   - every line is one JSON object with index, tokens, logprobs (one per token, <= 0)
 *     and finish_reason; --n gives one line per sample; --stop-ids cuts at the first stop
 *     id, keeps it and says "stop";
 *   - missing files, a config whose shapes differ from the safetensors, ids outside the
 *     vocabulary and a TP size the model cannot split exit 1 with a message naming the
 *     problem; malformed options exit 2.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/unit/engine_util.h"

#define OUT_MAX (1 << 16)

typedef struct run_result {
    int status;          /* exit status, or -1 when it did not exit normally */
    char out[OUT_MAX];   /* stdout */
    char err[OUT_MAX];   /* stderr */
} run_result;

static char tmpdir[] = "/tmp/rlb-test-generate-XXXXXX";

static void slurp(int fd, char *buf)
{
    lseek(fd, 0, SEEK_SET);
    ssize_t n = read(fd, buf, OUT_MAX - 1);
    buf[n > 0 ? n : 0] = '\0';
    close(fd);
}

static int temp_fd(const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    unlink(path);
    return fd;
}

/* Runs `rlb generate ARGS...` (NULL-terminated) and captures its output. */
static void run_generate(run_result *r, ...)
{
    char *argv[40] = {RLB_BIN, "generate"};
    int argc = 2;
    va_list ap;
    va_start(ap, r);
    for (char *a; argc < 39 && (a = va_arg(ap, char *));)
        argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    int ofd = temp_fd("stdout"), efd = temp_fd("stderr");
    assert_true(ofd >= 0 && efd >= 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(ofd, 1);
        dup2(efd, 2);
        execv(RLB_BIN, argv);
        _exit(127);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    r->status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    slurp(ofd, r->out);
    slurp(efd, r->err);
}

static void ids_arg(const int32_t *ids, int64_t n, char *buf, size_t len)
{
    size_t o = 0;
    for (int64_t i = 0; i < n; i++)
        o += (size_t)snprintf(buf + o, len - o, "%s%d", i ? "," : "", ids[i]);
}

/* Parses output line `index`; checks its shape and returns it (json_decref it). */
static json_t *sample_line(const char *out, int index)
{
    const char *line = out;
    for (int i = 0; i < index && line; i++) {
        line = strchr(line, '\n');
        line = line ? line + 1 : NULL;
    }
    assert_non_null(line);
    json_error_t jerr;
    json_t *j = json_loadb(line, strcspn(line, "\n"), 0, &jerr);
    assert_non_null(j);
    assert_int_equal(json_integer_value(json_object_get(j, "index")), index);
    json_t *toks = json_object_get(j, "tokens"), *lps = json_object_get(j, "logprobs");
    assert_true(json_is_array(toks) && json_is_array(lps));
    assert_int_equal(json_array_size(toks), json_array_size(lps));
    for (size_t i = 0; i < json_array_size(lps); i++)
        assert_true(json_real_value(json_array_get(lps, i)) <= 0.0);
    assert_true(json_is_string(json_object_get(j, "finish_reason")));
    return j;
}

static void assert_tokens(json_t *j, const int32_t *want, int64_t n, const char *finish)
{
    json_t *toks = json_object_get(j, "tokens");
    assert_int_equal(json_array_size(toks), n);
    for (int64_t i = 0; i < n; i++)
        assert_int_equal(json_integer_value(json_array_get(toks, (size_t)i)), want[i]);
    assert_string_equal(json_string_value(json_object_get(j, "finish_reason")), finish);
}

/* HF's greedy continuation of the fixture's prompt, at TP `tp`; on `device` (NULL: the
 * default) with fp32 weights. */
static void check_greedy_on(const char *name, int prompt, const char *tp, const char *device)
{
    fixture fx;
    assert_int_equal(fx_load(name, &fx), 0);
    const fx_prompt *p = &fx.prompts[prompt];
    char ids[1024], max[16];
    ids_arg(p->ids, p->n_ids, ids, sizeof ids);
    snprintf(max, sizeof max, "%lld", (long long)p->n_greedy);
    run_result *r = malloc(sizeof *r);
    if (device)
        run_generate(r, "--model", fx.dir, "--prompt-ids", ids, "--max-tokens", max,
                     "--temperature", "0", "--tp", tp, "--device", device, "--dtype", "fp32",
                     NULL);
    else
        run_generate(r, "--model", fx.dir, "--prompt-ids", ids, "--max-tokens", max,
                     "--temperature", "0", "--tp", tp, NULL);
    if (r->status != 0)
        fprintf(stderr, "%s", r->err);
    assert_int_equal(r->status, 0);
    json_t *j = sample_line(r->out, 0);
    assert_tokens(j, p->greedy, p->n_greedy, "length");
    json_decref(j);
    assert_null(strchr(strchr(r->out, '\n') + 1, '\n')); /* one line only */
    free(r);
    fx_free(&fx);
}

static void check_greedy(const char *name, int prompt, const char *tp)
{
    check_greedy_on(name, prompt, tp, NULL);
}

#ifdef RLB_TEST_CUDA
/* GPUs of this machine, by their device nodes (/dev/nvidiaN): no CUDA in this process. */
static int count_gpus(void)
{
    int n = 0;
    for (int i = 0; i < 64; i++) {
        char path[32];
        snprintf(path, sizeof path, "/dev/nvidia%d", i);
        n += access(path, F_OK) == 0;
    }
    return n;
}
#endif

/* TP on the GPU: one GPU per rank, NCCL between them, the unique id from rank 0 through the
 * ranks' shared memory. With two GPUs or more: HF's greedy tokens at TP 2, fp32 weights.
 * With one: TP 2 cannot have a GPU per rank, and says so (exit 1, naming the rank that
 * failed) instead of waiting. Skipped in builds without CUDA and where no GPU is. */
static void test_cuda_tp(void **state)
{
    (void)state;
#ifndef RLB_TEST_CUDA
    skip();
#else
    int gpus = count_gpus();
    if (gpus == 0)
        skip();
    if (gpus >= 2) {
        check_greedy_on("llama_gqa", 0, "2", "cuda");
        check_greedy_on("qwen2_tied", 1, "2", "cuda");
        return;
    }
    fixture fx;
    assert_int_equal(fx_load("llama_gqa", &fx), 0);
    run_result *r = malloc(sizeof *r);
    run_generate(r, "--model", fx.dir, "--prompt-ids", "1,2,3", "--max-tokens", "4", "--tp",
                 "2", "--device", "cuda", NULL);
    fprintf(stderr, "one GPU, --tp 2: exit %d: %s", r->status, r->err);
    assert_int_equal(r->status, 1);
    assert_non_null(strstr(r->err, "rank 1"));
    free(r);
    fx_free(&fx);
#endif
}

static void test_greedy_tp1(void **state)
{
    (void)state;
    for (int i = 0; i < 2; i++) {
        check_greedy("llama_gqa", i, "1");
        check_greedy("qwen2_tied", i, "1");
    }
}

static void test_greedy_tp(void **state)
{
    (void)state;
    check_greedy("llama_gqa", 1, "2");
    check_greedy("llama_gqa", 0, "4");
    check_greedy("qwen2_tied", 1, "4");
}

static void test_samples_and_stop(void **state)
{
    (void)state;
    fixture fx;
    assert_int_equal(fx_load("llama_gqa", &fx), 0);
    const fx_prompt *p = &fx.prompts[0];
    char ids[1024], stop[16];
    ids_arg(p->ids, p->n_ids, ids, sizeof ids);
    run_result *r = malloc(sizeof *r);
    run_generate(r, "--model", fx.dir, "--prompt-ids", ids, "--max-tokens", "6", "--n", "3",
                 "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "7",
                 NULL);
    assert_int_equal(r->status, 0);
    for (int i = 0; i < 3; i++) {
        json_t *j = sample_line(r->out, i);
        assert_int_equal(json_array_size(json_object_get(j, "tokens")), 6);
        json_decref(j);
    }
    /* Greedy with HF's fourth greedy token as the stop id. */
    snprintf(stop, sizeof stop, "%d", p->greedy[3]);
    int64_t first = 0;
    while (p->greedy[first] != p->greedy[3])
        first++;
    run_generate(r, "--model", fx.dir, "--prompt-ids", ids, "--max-tokens", "32",
                 "--temperature", "0", "--stop-ids", stop, NULL);
    assert_int_equal(r->status, 0);
    json_t *j = sample_line(r->out, 0);
    assert_tokens(j, p->greedy, first + 1, "stop");
    json_decref(j);
    free(r);
    fx_free(&fx);
}

/* Runs with ARGS and expects `status` with `needle` in stderr. */
#define EXPECT_FAIL(status_, needle_, ...)                                                   \
    do {                                                                                     \
        run_generate(r, __VA_ARGS__, NULL);                                                  \
        if (r->status != (status_) || !strstr(r->err, needle_))                              \
            fprintf(stderr, "status %d, stderr: %s\n", r->status, r->err);                   \
        assert_int_equal(r->status, status_);                                                \
        assert_non_null(strstr(r->err, needle_));                                            \
        assert_string_equal(r->out, "");                                                     \
    } while (0)

static void test_errors(void **state)
{
    (void)state;
    const char *llama = fx_dir("llama_gqa");
    char cfg_only[300], bad_shape[300], path[400], cmd[1200];
    snprintf(cfg_only, sizeof cfg_only, "%s/cfg_only", tmpdir);
    snprintf(bad_shape, sizeof bad_shape, "%s/bad_shape", tmpdir);
    assert_int_equal(mkdir(cfg_only, 0700), 0);
    assert_int_equal(mkdir(bad_shape, 0700), 0);
    snprintf(cmd, sizeof cmd, "cp %s/config.json %s/ && sed 's/\"intermediate_size\": 128/"
             "\"intermediate_size\": 64/' %s/config.json > %s/config.json", llama, cfg_only,
             llama, bad_shape);
    assert_int_equal(system(cmd), 0);
    char target[300];
    snprintf(target, sizeof target, "%s/model.safetensors", llama);
    snprintf(path, sizeof path, "%s/model.safetensors", bad_shape);
    assert_int_equal(symlink(target, path), 0);

    run_result *r = malloc(sizeof *r);
    EXPECT_FAIL(1, "no config.json", "--model", "/nonexistent/model", "--prompt-ids", "1");
    EXPECT_FAIL(1, "model.safetensors", "--model", cfg_only, "--prompt-ids", "1");
    EXPECT_FAIL(1, "down_proj.weight' has shape [64, 128]", "--model", bad_shape,
                "--prompt-ids", "1");
    EXPECT_FAIL(1, "prompt id 300 at position 1 is outside the vocabulary [0, 300)",
                "--model", llama, "--prompt-ids", "5,300");
    EXPECT_FAIL(1, "stop id 1000", "--model", llama, "--prompt-ids", "5", "--stop-ids",
                "3,1000");
    EXPECT_FAIL(1, "TP size 3", "--model", llama, "--prompt-ids", "1", "--tp", "3");
    EXPECT_FAIL(1, "TP size 8", "--model", llama, "--prompt-ids", "1", "--tp", "8");
    EXPECT_FAIL(2, "--model and --prompt-ids are required", "--prompt-ids", "1");
    EXPECT_FAIL(2, "--model and --prompt-ids are required", "--model", llama);
    EXPECT_FAIL(2, "unknown or incomplete option", "--model", llama, "--prompt-ids", "1",
                "--bogus", "3");
    EXPECT_FAIL(2, "unknown or incomplete option", "--model", llama, "--prompt-ids");
    EXPECT_FAIL(2, "unexpected argument 'extra'", "--model", llama, "--prompt-ids", "1",
                "extra");
    const char *bad_ids[] = {"", "1,,2", "1,", ",1", "-1", "1;2", "a", "99999999999", "1 2"};
    for (size_t i = 0; i < sizeof bad_ids / sizeof *bad_ids; i++)
        EXPECT_FAIL(2, "--prompt-ids", "--model", llama, "--prompt-ids", bad_ids[i]);
    EXPECT_FAIL(2, "--max-tokens", "--model", llama, "--prompt-ids", "1", "--max-tokens", "0");
    EXPECT_FAIL(2, "--max-tokens", "--model", llama, "--prompt-ids", "1", "--max-tokens", "4x");
    EXPECT_FAIL(2, "--temperature", "--model", llama, "--prompt-ids", "1", "--temperature",
                "-0.5");
    EXPECT_FAIL(2, "--temperature", "--model", llama, "--prompt-ids", "1", "--temperature",
                "nan");
    EXPECT_FAIL(2, "--top-p", "--model", llama, "--prompt-ids", "1", "--top-p", "0");
    EXPECT_FAIL(2, "--top-p", "--model", llama, "--prompt-ids", "1", "--top-p", "1.5");
    EXPECT_FAIL(2, "--top-k", "--model", llama, "--prompt-ids", "1", "--top-k", "-2");
    EXPECT_FAIL(2, "--n", "--model", llama, "--prompt-ids", "1", "--n", "0");
    EXPECT_FAIL(2, "--tp", "--model", llama, "--prompt-ids", "1", "--tp", "0");
    EXPECT_FAIL(2, "--quant", "--model", llama, "--prompt-ids", "1", "--quant", "fp4");
    EXPECT_FAIL(2, "--seed", "--model", llama, "--prompt-ids", "1", "--seed", "-1");
    run_generate(r, "--help", NULL);
    assert_int_equal(r->status, 0);
    assert_non_null(strstr(r->out, "usage: rlb generate"));
    free(r);
    snprintf(cmd, sizeof cmd, "rm -rf %s %s", cfg_only, bad_shape);
    assert_int_equal(system(cmd), 0);
}

static int setup(void **state)
{
    (void)state;
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    return rmdir(tmpdir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_tp1),
        cmocka_unit_test(test_greedy_tp),
        cmocka_unit_test(test_cuda_tp),
        cmocka_unit_test(test_samples_and_stop),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
