/* test_client_args: the parts of librlb that need no bridge: option and struct versioning,
 * argument checks, connect failures with their texts, the byte counts of full / FSDP2 /
 * FSDP1 descriptors (against values worked out by hand from DESIGN §4), and the defaults of
 * the initializers (vLLM's SamplingParams defaults).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "rlb/rlb.h"

static char sockdir[64];

static int setup(void **state)
{
    strcpy(sockdir, "/tmp/rlb-test-args-XXXXXX");
    assert_non_null(mkdtemp(sockdir));
    setenv("RLB_SOCKET_DIR", sockdir, 1);
    return 0;
}

static int teardown(void **state)
{
    rmdir(sockdir);
    return 0;
}

static void test_options_init(void **state)
{
    rlb_client_options a, b = RLB_CLIENT_OPTIONS_INIT;
    memset(&a, 0xab, sizeof(a));
    rlb_client_options_init(&a);
    assert_int_equal(a.struct_size, sizeof(rlb_client_options));
    assert_int_equal(b.struct_size, sizeof(rlb_client_options));
    assert_null(a.socket);
    assert_int_equal(a.connect_timeout_ms, 0);
    assert_int_equal(a.request_timeout_ms, 0);
    assert_int_equal(a.observer, 0);
    assert_int_equal(a.world, 1);
    assert_int_equal(a.rank, 0);
    rlb_client_options_init(NULL); /* no crash */
}

static void test_connect_refusals(void **state)
{
    rlb_client *c = (rlb_client *)0x1;
    rlb_client_options o = RLB_CLIENT_OPTIONS_INIT;
    assert_int_equal(rlb_connect(NULL, &c), RLB_EINVAL);
    assert_int_equal(rlb_connect(&o, NULL), RLB_EINVAL);

    o.struct_size = sizeof(o) - 4;
    assert_int_equal(rlb_connect(&o, &c), RLB_EVERSION);
    assert_null(c);
    assert_non_null(strstr(rlb_last_error(NULL), "struct_size"));
    o.struct_size = sizeof(o) + 8;
    assert_int_equal(rlb_connect(&o, &c), RLB_EVERSION);

    rlb_client_options_init(&o);
    o.rank = 2;
    o.world = 2;
    assert_int_equal(rlb_connect(&o, &c), RLB_EINVAL);
    assert_non_null(strstr(rlb_last_error(NULL), "rank (2) < world (2)"));
    o.rank = 1; /* world 0 counts as 1 */
    o.world = 0;
    assert_int_equal(rlb_connect(&o, &c), RLB_EINVAL);
    rlb_client_options_init(&o);
    o.connect_timeout_ms = -1;
    assert_int_equal(rlb_connect(&o, &c), RLB_EINVAL);
    rlb_client_options_init(&o);
    o.observer = 2;
    assert_int_equal(rlb_connect(&o, &c), RLB_EINVAL);

    /* Nobody listens: by name in RLB_SOCKET_DIR and by path. */
    rlb_client_options_init(&o);
    o.connect_timeout_ms = 500;
    assert_int_equal(rlb_connect(&o, &c), RLB_ENOTFOUND);
    assert_non_null(strstr(rlb_last_error(NULL), sockdir));
    assert_non_null(strstr(rlb_last_error(NULL), "rlb bridge"));
    o.socket = "/nonexistent-dir/sock";
    assert_int_equal(rlb_connect(&o, &c), RLB_ENOTFOUND);
    char longpath[400];
    memset(longpath, 'a', sizeof(longpath) - 1);
    longpath[0] = '/';
    longpath[sizeof(longpath) - 1] = 0;
    o.socket = longpath;
    assert_int_equal(rlb_connect(&o, &c), RLB_ETOOBIG);
    assert_null(c);
}

/* Every call that takes a client accepts NULL with RLB_EINVAL (or a harmless default). */
static void test_null_client(void **state)
{
    void *p;
    rlb_sync_stats st = {.struct_size = sizeof(st)};
    rlb_ticket t;
    rlb_result *r;
    rlb_stat_list *l;
    rlb_client_stats cs = {.struct_size = sizeof(cs)};
    rlb_tensor_desc d = RLB_TENSOR_DESC_INIT;
    rlb_generate_request req = RLB_GENERATE_REQUEST_INIT;
    assert_int_equal(rlb_alloc_host(NULL, 64, &p), RLB_EINVAL);
    assert_int_equal(rlb_free_host(NULL, NULL), RLB_EINVAL);
    assert_int_equal(rlb_register(NULL, &d, 1), RLB_EINVAL);
    assert_int_equal(rlb_unregister(NULL, NULL, 0), RLB_EINVAL);
    assert_int_equal(rlb_publish(NULL, 1, &st), RLB_EINVAL);
    assert_int_equal(rlb_generate_submit(NULL, &req, &t), RLB_EINVAL);
    assert_int_equal(rlb_generate_poll(NULL, 1, &r), RLB_EINVAL);
    assert_int_equal(rlb_generate_wait(NULL, 1, 10, &r), RLB_EINVAL);
    assert_int_equal(rlb_generate(NULL, &req, 10, &r), RLB_EINVAL);
    assert_int_equal(rlb_bridge_stats(NULL, &l), RLB_EINVAL);
    assert_int_equal(rlb_client_stats_get(NULL, &cs), RLB_EINVAL);
    assert_int_equal(rlb_weight_version(NULL), 0);
    assert_int_equal(rlb_sleep(NULL), RLB_EINVAL);
    assert_int_equal(rlb_wake(NULL), RLB_EINVAL);
    rlb_close(NULL);
    rlb_result_free(NULL);
    rlb_stat_list_free(NULL);
    assert_int_equal(rlb_result_num_samples(NULL), 0);
    assert_null(rlb_result_sample(NULL, 0));
    assert_int_equal(rlb_stat_list_size(NULL), 0);
    assert_int_equal(rlb_stat_list_get(NULL, 0, NULL, NULL), RLB_EINVAL);
    assert_int_equal(rlb_stat_list_find(NULL, "x", NULL), RLB_EINVAL);
}

static void test_sampling_defaults(void **state)
{
    rlb_sampling_params p, q = RLB_SAMPLING_PARAMS_INIT;
    memset(&p, 0x5a, sizeof(p));
    rlb_sampling_params_init(&p);
    assert_int_equal(q.struct_size, sizeof(q));
    assert_int_equal(q.max_tokens, 16);
    /* vLLM SamplingParams(): n=1, temperature=1.0, top_p=1.0, top_k=-1 (0 in newer
     * releases, same meaning), seed=None, max_tokens=16, stop_token_ids=[],
     * logprobs=None. */
    assert_int_equal(p.struct_size, sizeof(p));
    assert_int_equal(p.n, 1);
    assert_true(p.temperature == 1.0f);
    assert_true(p.top_p == 1.0f);
    assert_int_equal(p.top_k, -1);
    assert_int_equal(p.seed, -1);
    assert_int_equal(p.max_tokens, 16);
    assert_null(p.stop_token_ids);
    assert_int_equal(p.n_stop_token_ids, 0);
    assert_int_equal(p.logprobs, -1);
    rlb_generate_request r;
    rlb_generate_request_init(&r);
    assert_int_equal(r.struct_size, sizeof(r));
    assert_null(r.prompts);
    assert_null(r.sampling);
    assert_string_equal(rlb_finish_reason_name(RLB_REASON_STOP), "stop");
    assert_string_equal(rlb_finish_reason_name(RLB_REASON_LENGTH), "length");
    assert_string_equal(rlb_finish_reason_name(RLB_REASON_ABORT), "abort");
    assert_string_equal(rlb_finish_reason_name((rlb_finish_reason)7), "?");
}

static rlb_tensor_desc desc2(const char *name, rlb_dtype dt, uint64_t d0, uint64_t d1)
{
    rlb_tensor_desc d;
    rlb_tensor_desc_init(&d);
    d.name = name;
    d.dtype = dt;
    d.ndim = 2;
    d.shape[0] = d0;
    d.shape[1] = d1;
    return d;
}

/* rlb_tensor_bytes refuses d with code, and rlb_last_error(NULL) then holds text. */
static void refused(const rlb_tensor_desc *d, int code, const char *text)
{
    uint64_t b;
    int rc = rlb_tensor_bytes(d, &b);
    const char *err = rlb_last_error(NULL);
    if (rc != code)
        fail_msg("rc %d (%s), expected %d", rc, err, code);
    if (!strstr(err, text))
        fail_msg("error text '%s' does not say '%s'", err, text);
}

static void test_tensor_bytes_full_fsdp2(void **state)
{
    uint64_t b = 0;
    rlb_tensor_desc d = desc2("w", RLB_DTYPE_F32, 250, 64);
    assert_int_equal(rlb_tensor_bytes(&d, &b), 0);
    assert_int_equal(b, 250 * 64 * 4);
    d.dtype = RLB_DTYPE_BF16;
    assert_int_equal(rlb_tensor_bytes(&d, &b), 0);
    assert_int_equal(b, 250 * 64 * 2);

    /* FSDP2 over 3 ranks of d0 = 10: c = 4; ranks hold 4, 4, 2 rows. */
    d = desc2("w", RLB_DTYPE_F32, 10, 6);
    d.layout = RLB_TENSOR_FSDP2;
    d.shard_world = 3;
    const uint64_t rows[3] = {4, 4, 2};
    for (uint32_t r = 0; r < 3; r++) {
        d.shard_rank = r;
        assert_int_equal(rlb_tensor_bytes(&d, &b), 0);
        assert_int_equal(b, rows[r] * 6 * 4);
    }
    /* d0 = 2 over 4 ranks: c = 1; ranks 2 and 3 hold nothing. */
    d.shape[0] = 2;
    d.shard_world = 4;
    d.shard_rank = 3;
    assert_int_equal(rlb_tensor_bytes(&d, &b), 0);
    assert_int_equal(b, 0);
    /* d0 = 5 over 4 ranks: c = 2; rank 2 holds row 4 only, rank 3 nothing. */
    d.shape[0] = 5;
    d.shard_rank = 2;
    assert_int_equal(rlb_tensor_bytes(&d, &b), 0);
    assert_int_equal(b, 1 * 6 * 4);
    d.shard_rank = 3;
    assert_int_equal(rlb_tensor_bytes(&d, &b), 0);
    assert_int_equal(b, 0);
    /* A vector, 1-D FSDP2. */
    d.ndim = 1;
    d.shape[0] = 7;
    d.shard_world = 2;
    d.shard_rank = 1;
    assert_int_equal(rlb_tensor_bytes(&d, &b), 0);
    assert_int_equal(b, 3 * 4);
}

static void test_tensor_bytes_fsdp1(void **state)
{
    /* Two parameters [3,4] and [5] with 4 elements of alignment padding after the first
     * (12 + 4 + 5 = 21), padded to a multiple of world 2: total 22, 11 per rank. */
    rlb_fsdp1_entry e[3] = {
        {.name = "a.weight", .ndim = 2, .shape = {3, 4}, .numel = 12},
        {.name = NULL, .numel = 4, .padding = 1},
        {.name = "b.weight", .ndim = 1, .shape = {5}, .numel = 5},
    };
    rlb_tensor_desc d;
    rlb_tensor_desc_init(&d);
    d.name = "unit0";
    d.dtype = RLB_DTYPE_F16;
    d.ndim = 1;
    d.shape[0] = 22;
    d.layout = RLB_TENSOR_FSDP1;
    d.shard_world = 2;
    d.shard_rank = 1;
    d.entries = e;
    d.n_entries = 3;
    uint64_t b = 0;
    assert_int_equal(rlb_tensor_bytes(&d, &b), 0);
    assert_int_equal(b, 11 * 2);
    assert_string_equal(rlb_last_error(NULL), "");

    d.shape[0] = 24; /* not the next multiple of 2 above 21 */
    refused(&d, RLB_ESHAPE, "tensor 'unit0': entries hold 21 elements; padded to a multiple "
                            "of 2 that is not the total 24");
    d.shape[0] = 21; /* not a multiple of the world */
    refused(&d, RLB_ESHAPE, "tensor 'unit0': total 21 is not a multiple of shard_world 2");
    d.shape[0] = 22;
    e[0].numel = 11; /* shape says 12 */
    refused(&d, RLB_ESHAPE, "tensor 'unit0': entry 0 (a.weight): shape does not hold numel 11");
    e[0].numel = 12;
    e[1].name = "pad"; /* padding has no name */
    refused(&d, RLB_EINVAL, "tensor 'unit0': entry 1: padding has no name");
    e[1].name = NULL;
    e[2].name = NULL; /* a parameter needs one */
    refused(&d, RLB_EINVAL, "tensor 'unit0': entry 2: a parameter needs a name");
    e[2].name = "b.weight";
    e[2].numel = 7; /* runs past the total */
    refused(&d, RLB_ESHAPE, "tensor 'unit0': entry 2: numel 7 is 0 or runs past the total 22");
    e[2].numel = 5;
    d.n_entries = 0;
    refused(&d, RLB_EINVAL, "tensor 'unit0': FSDP1 needs its FlatParameter entries");
    d.n_entries = 3;
    d.ndim = 2;
    d.shape[1] = 1;
    refused(&d, RLB_ESHAPE, "tensor 'unit0': an FSDP1 FlatParameter has shape [total], not 2 "
                            "dimensions");
}

static void test_tensor_bytes_refusals(void **state)
{
    uint64_t b;
    rlb_tensor_desc d = desc2("w", RLB_DTYPE_F32, 4, 4);
    refused(NULL, RLB_EINVAL, "rlb_tensor_bytes needs a descriptor and an output pointer");
    assert_int_equal(rlb_tensor_bytes(&d, NULL), RLB_EINVAL);
    d.struct_size--;
    refused(&d, RLB_EVERSION, "rlb_tensor_desc.struct_size is");
    d = desc2(NULL, RLB_DTYPE_F32, 4, 4);
    refused(&d, RLB_EINVAL, "tensor '(no name)': a name of 1..1024 bytes is required");
    d = desc2("", RLB_DTYPE_F32, 4, 4);
    refused(&d, RLB_EINVAL, "tensor '': a name of 1..1024 bytes is required");
    const rlb_dtype bad_dtypes[] = {RLB_DTYPE_I8, RLB_DTYPE_I32, RLB_DTYPE_F8E4M3,
                                    RLB_DTYPE_COUNT_};
    for (size_t i = 0; i < sizeof(bad_dtypes) / sizeof(bad_dtypes[0]); i++) {
        char text[64];
        snprintf(text, sizeof(text), "tensor 'w': dtype %d: weights are F32, BF16 or F16",
                 (int)bad_dtypes[i]);
        d = desc2("w", bad_dtypes[i], 4, 4);
        refused(&d, RLB_EDTYPE, text);
    }
    d = desc2("w", RLB_DTYPE_F32, 4, 0);
    refused(&d, RLB_ESHAPE, "tensor 'w': shape[1] is 0");
    d = desc2("w", RLB_DTYPE_F32, 4, 4);
    d.ndim = 0;
    refused(&d, RLB_ESHAPE, "tensor 'w': ndim 0 is outside 1..8");
    d.ndim = RLB_MAX_DIMS + 1;
    refused(&d, RLB_ESHAPE, "tensor 'w': ndim 9 is outside 1..8");
    d = desc2("w", RLB_DTYPE_F32, UINT64_C(1) << 40, UINT64_C(1) << 40); /* overflows */
    refused(&d, RLB_ESHAPE, "tensor 'w': its shape holds more than 2^60 elements");
    d = desc2("w", RLB_DTYPE_F32, 4, 4);
    d.device = (rlb_device)7;
    refused(&d, RLB_EINVAL, "tensor 'w': device 7 is not CPU or CUDA");
    d = desc2("w", RLB_DTYPE_F32, 4, 4);
    d.layout = (rlb_tensor_layout)9;
    refused(&d, RLB_EINVAL, "tensor 'w': unknown layout 9");
    d.layout = RLB_TENSOR_FSDP2;
    d.shard_world = 0;
    refused(&d, RLB_EINVAL, "tensor 'w': shard_rank 0 must be < shard_world 0");
    d.shard_world = 2;
    d.shard_rank = 2;
    refused(&d, RLB_EINVAL, "tensor 'w': shard_rank 2 must be < shard_world 2");
    /* A success clears the text. */
    d.shard_rank = 1;
    assert_int_equal(rlb_tensor_bytes(&d, &b), 0);
    assert_string_equal(rlb_last_error(NULL), "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_options_init),
        cmocka_unit_test(test_connect_refusals),
        cmocka_unit_test(test_null_client),
        cmocka_unit_test(test_sampling_defaults),
        cmocka_unit_test(test_tensor_bytes_full_fsdp2),
        cmocka_unit_test(test_tensor_bytes_fsdp1),
        cmocka_unit_test(test_tensor_bytes_refusals),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
