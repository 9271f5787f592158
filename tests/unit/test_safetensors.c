/* test_safetensors.c: the safetensors parser, checkpoint opening and writer.
 *
 * Files are built byte by byte here (length prefix, JSON text, data) rather than by the
 * writer under test, so the reader is checked against the format itself: a valid single
 * file, unaligned tensors read back through memcpy, a sharded checkpoint of two files with
 * its index, and every validation failure with its code and the name it must mention.
 * The writer is then checked against the same hand-made expectations. The directory given
 * as the first argument (tests/fuzz/corpus/safetensors) also holds a file written by the
 * reference safetensors library (0.8.0, from torch tensors of every dtype we map); its
 * expected names, shapes and FNV-1a hashes of each tensor's bytes were computed there, by
 * that library, from the tensors themselves.
 */
#include <ftw.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "model/safetensors.h"

/* A whole file in memory: 8-byte little-endian length of json, json, then data. */
typedef struct blob {
    unsigned char *bytes; /* malloc'd */
    size_t len;           /* total length */
} blob;

static blob make_file(const char *json, const void *data, size_t data_len)
{
    size_t n = strlen(json);
    blob b = {malloc(8 + n + data_len + 1), 8 + n + data_len};
    assert_non_null(b.bytes);
    for (int i = 0; i < 8; i++)
        b.bytes[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(b.bytes + 8, json, n);
    if (data_len)
        memcpy(b.bytes + 8 + n, data, data_len);
    return b;
}

static void save(const char *dir, const char *name, const void *bytes, size_t len)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(bytes, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static void save_blob(const char *dir, const char *name, blob b)
{
    save(dir, name, b.bytes, b.len);
    free(b.bytes);
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static char *make_dir(void)
{
    char *dir = strdup("/tmp/rlb-test-st-XXXXXX");
    assert_non_null(mkdtemp(dir));
    return dir;
}

static void remove_dir(char *dir)
{
    nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    free(dir);
}

/* Parses a JSON header over `data` and requires failure with code and needle. */
static void expect_parse_fail(const char *json, const void *data, size_t data_len, int code,
                              const char *needle)
{
    blob b = make_file(json, data, data_len);
    rlb_st_header h;
    char err[256] = "";
    int rc = rlb__st_parse(b.bytes, b.len, &h, err, sizeof(err));
    if (rc != code || !strstr(err, needle))
        print_error("header %s\n  rc %d (want %d), err '%s' (want '%s')\n", json, rc, code,
                    err, needle);
    assert_int_equal(rc, code);
    assert_non_null(strstr(err, needle));
    assert_null(h.tensors);
    free(b.bytes);
}

/* Hand-laid data area: "emb" F32 [2,2] at 0..16, "bias" BF16 [3] at 16..22, "scale" F8_E4M3
 * [1] at 22..23, "empty" I32 [0,5] at 23..23, "pos" I64 [1] at 23..31 (unaligned). */
static const char SINGLE_JSON[] =
    "{\"__metadata__\":{\"format\":\"pt\"},"
    "\"pos\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[23,31]},"
    "\"emb\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
    "\"empty\":{\"dtype\":\"I32\",\"shape\":[0,5],\"data_offsets\":[23,23]},"
    "\"bias\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[16,22]},"
    "\"scale\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[22,23]}}";

static void single_data(unsigned char data[31])
{
    const float emb[4] = {1.0f, -2.0f, 0.5f, 3.25f};
    const uint16_t bias[3] = {0x3f80, 0xc000, 0x0000}; /* bf16 1, -2, 0 */
    const int64_t pos = -1234567890123LL;
    memcpy(data, emb, 16);
    memcpy(data + 16, bias, 6);
    data[22] = 0x38; /* e4m3 1.0 */
    memcpy(data + 23, &pos, 8);
}

static void check_single(const rlb_st_tensor *ts, size_t n, const unsigned char *data,
                         uint64_t data_start)
{
    /* Name order: bias, emb, empty, pos, scale. */
    static const char *const names[] = {"bias", "emb", "empty", "pos", "scale"};
    static const rlb_dtype dtypes[] = {RLB_DTYPE_BF16, RLB_DTYPE_F32, RLB_DTYPE_I32,
                                       RLB_DTYPE_I64, RLB_DTYPE_F8E4M3};
    static const uint64_t begins[] = {16, 0, 23, 23, 22}, sizes[] = {6, 16, 0, 8, 1};
    assert_int_equal(n, 5);
    for (size_t i = 0; i < 5; i++) {
        assert_string_equal(ts[i].name, names[i]);
        assert_int_equal(ts[i].dtype, dtypes[i]);
        assert_int_equal(ts[i].nbytes, sizes[i]);
        assert_int_equal(ts[i].file_offset, data_start + begins[i]);
        assert_memory_equal(ts[i].data, data + begins[i], sizes[i] ? sizes[i] : 1);
    }
    assert_int_equal(ts[1].ndim, 2);
    assert_int_equal(ts[1].shape[0], 2);
    assert_int_equal(ts[1].shape[1], 2);
    assert_int_equal(ts[2].ndim, 2);
    assert_int_equal(ts[2].shape[0], 0);
    assert_int_equal(ts[2].shape[1], 5);
    /* Unaligned element reads go through memcpy, as the header says readers must. */
    int64_t pos;
    memcpy(&pos, ts[3].data, 8);
    assert_int_equal(pos, -1234567890123LL);
    float e3;
    memcpy(&e3, (const unsigned char *)ts[1].data + 12, 4);
    assert_true(e3 == 3.25f);
}

static void test_parse_valid(void **state)
{
    unsigned char data[32];
    single_data(data);
    blob b = make_file(SINGLE_JSON, data, 31);
    rlb_st_header h;
    char err[256] = "";
    assert_int_equal(rlb__st_parse(b.bytes, b.len, &h, err, sizeof(err)), 0);
    assert_int_equal(h.data_start, 8 + strlen(SINGLE_JSON));
    assert_int_equal(h.data_bytes, 31);
    check_single(h.tensors, h.n_tensors, b.bytes + h.data_start, h.data_start);
    rlb__st_header_free(&h);
    rlb__st_header_free(&h); /* a second free is harmless */
    free(b.bytes);

    /* Trailing spaces after the JSON are allowed padding; "{}" with no data is valid. */
    b = make_file("{}      ", NULL, 0);
    assert_int_equal(rlb__st_parse(b.bytes, b.len, &h, err, sizeof(err)), 0);
    assert_int_equal(h.n_tensors, 0);
    rlb__st_header_free(&h);
    free(b.bytes);
}

static void test_unaligned(void **state)
{
    /* A 1-byte tensor first and a header padded so the data area starts 4-aligned: the
     * F32 tensor then starts at a file offset of 1 mod 4, the F16 one at an odd offset. */
    char json[256] = "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                     "\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[1,13]},"
                     "\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[13,17]}}";
    while ((8 + strlen(json)) % 4)
        strcat(json, " ");
    unsigned char data[17] = {0xab};
    const float w[3] = {1.5f, -0.25f, 1e30f};
    const uint16_t hv[2] = {0x3c00, 0xbc00}; /* f16 1, -1 */
    memcpy(data + 1, w, 12);
    memcpy(data + 13, hv, 4);
    blob b = make_file(json, data, sizeof(data));
    rlb_st_header h;
    char err[256] = "";
    assert_int_equal(rlb__st_parse(b.bytes, b.len, &h, err, sizeof(err)), 0);
    const rlb_st_tensor *tw = &h.tensors[2], *th = &h.tensors[1];
    assert_string_equal(tw->name, "w");
    assert_string_equal(th->name, "h");
    assert_int_equal(tw->file_offset % 4, 1);
    assert_int_equal(th->file_offset % 2, 1);
    for (int i = 0; i < 3; i++) {
        float v;
        memcpy(&v, (const unsigned char *)tw->data + 4 * i, 4);
        assert_true(v == w[i]);
    }
    uint16_t h1;
    memcpy(&h1, (const unsigned char *)th->data + 2, 2);
    assert_int_equal(h1, 0xbc00);
    rlb__st_header_free(&h);
    free(b.bytes);
}

static void test_parse_failures(void **state)
{
    unsigned char data[64] = {0};
    rlb_st_header h;
    char err[256];

    /* Truncated: shorter than the length prefix, and a length past the end. */
    assert_int_equal(rlb__st_parse(data, 7, &h, err, sizeof(err)), RLB_EINVAL);
    assert_non_null(strstr(err, "truncated"));
    blob b = make_file("{}", NULL, 0);
    b.bytes[0] = 3;
    assert_int_equal(rlb__st_parse(b.bytes, b.len, &h, err, sizeof(err)), RLB_EINVAL);
    assert_non_null(strstr(err, "truncated"));
    /* Header over the cap: refused before anything is read. */
    uint64_t big = RLB_ST_MAX_HEADER + 1ull;
    for (int i = 0; i < 8; i++)
        b.bytes[i] = (unsigned char)(big >> (8 * i));
    assert_int_equal(rlb__st_parse(b.bytes, b.len, &h, err, sizeof(err)), RLB_ETOOBIG);
    memset(b.bytes, 0xff, 8);
    assert_int_equal(rlb__st_parse(b.bytes, b.len, &h, err, sizeof(err)), RLB_ETOOBIG);
    free(b.bytes);

    expect_parse_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}", data,
                      8, RLB_EINVAL, "invalid JSON");
    expect_parse_fail("", NULL, 0, RLB_EINVAL, "invalid JSON");
    expect_parse_fail("[1,2]", NULL, 0, RLB_EINVAL, "must be a JSON object");
    expect_parse_fail("\"x\"", NULL, 0, RLB_EINVAL, "invalid JSON");
    /* Offsets outside the data area. */
    expect_parse_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}",
                      data, 12, RLB_EINVAL, "'a': data_offsets [0, 16] are not inside");
    expect_parse_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", data,
                      12, RLB_EINVAL, "'a'");
    /* A gap before a tensor. */
    expect_parse_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
                      data, 12, RLB_EINVAL, "'b' starts at data offset 8, expected 4 (a gap");
    /* Overlapping tensors. */
    expect_parse_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                      data, 12, RLB_EINVAL, "'b' starts at data offset 4, expected 8 (it overlaps");
    /* Bytes after the last tensor. */
    expect_parse_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", data,
                      12, RLB_EINVAL, "4 bytes after the last tensor");
    /* Shape x dtype size disagreeing with the offsets. */
    expect_parse_fail("{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,8]}}",
                      data, 8, RLB_EINVAL, "'a': shape x BF16 is 12 bytes but data_offsets span 8");
    expect_parse_fail("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],"
                      "\"data_offsets\":[0,8]}}",
                      data, 8, RLB_EINVAL, "'a': shape size overflows");
    /* Unknown or unsupported dtypes are named. */
    expect_parse_fail("{\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", data,
                      8, RLB_EDTYPE, "unsupported dtype 'F64'");
    expect_parse_fail("{\"w\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[0,1]}}", data,
                      1, RLB_EDTYPE, "'w': unsupported dtype 'BOOL'");
    /* Duplicate names. */
    expect_parse_fail("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                      "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                      data, 2, RLB_EEXIST, "duplicate name");
    /* Malformed entries. */
    expect_parse_fail("{\"a\":[1]}", NULL, 0, RLB_EINVAL, "'a' must be an object");
    expect_parse_fail("{\"a\":{\"shape\":[1],\"data_offsets\":[0,1]}}", data, 1, RLB_EINVAL,
                      "'a': 'dtype' missing");
    expect_parse_fail("{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]}}", data,
                      1, RLB_EINVAL, "'a': 'shape' must be");
    expect_parse_fail("{\"a\":{\"dtype\":\"U8\",\"shape\":\"1\",\"data_offsets\":[0,1]}}", data,
                      1, RLB_EINVAL, "'a': 'shape' must be");
    expect_parse_fail("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0]}}", data, 1,
                      RLB_EINVAL, "'a': 'data_offsets' must be");
    expect_parse_fail("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}",
                      data, 1, RLB_EINVAL, "'a': 'data_offsets' must be");
    expect_parse_fail("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}}", data,
                      1, RLB_EINVAL, "'a': 'data_offsets' must be");
    expect_parse_fail("{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],"
                      "\"data_offsets\":[0,1]}}",
                      data, 1, RLB_EUNSUPPORTED, "'a' has 9 dimensions");
    expect_parse_fail("{\"__metadata__\":{\"format\":1}}", NULL, 0, RLB_EINVAL,
                      "'__metadata__.format' must be a string");
    expect_parse_fail("{\"__metadata__\":[]}", NULL, 0, RLB_EINVAL,
                      "'__metadata__' must be an object");
    assert_int_equal(rlb__st_parse(NULL, 8, &h, NULL, 0), RLB_EINVAL);
}

static void test_open_single(void **state)
{
    unsigned char data[32];
    single_data(data);
    char *dir = make_dir();
    char err[256] = "";
    rlb_st_checkpoint *ck = NULL;
    /* An empty directory holds no checkpoint. */
    assert_int_equal(rlb__st_open(dir, &ck, err, sizeof(err)), RLB_ENOTFOUND);
    assert_non_null(strstr(err, "model.safetensors"));
    assert_null(ck);
    save_blob(dir, "model.safetensors", make_file(SINGLE_JSON, data, 31));
    uint64_t data_start = 8 + strlen(SINGLE_JSON);

    assert_int_equal(rlb__st_open(dir, &ck, err, sizeof(err)), 0);
    assert_int_equal(rlb__st_count(ck), 5);
    assert_int_equal(rlb__st_file_count(ck), 1);
    check_single(rlb__st_at(ck, 0), rlb__st_count(ck), data, data_start);
    assert_null(rlb__st_at(ck, 5));
    const rlb_st_tensor *pos = rlb__st_find(ck, "pos");
    assert_non_null(pos);
    assert_int_equal(pos->file, 0);
    uint64_t len = 0;
    const unsigned char *base = rlb__st_file_base(ck, 0, &len);
    assert_int_equal(len, data_start + 31);
    assert_ptr_equal(base + pos->file_offset, pos->data);
    assert_null(rlb__st_file_base(ck, 1, &len));
    assert_null(rlb__st_find(ck, "missing"));
    assert_null(rlb__st_find(ck, "__metadata__"));
    rlb__st_close(ck);

    /* The file itself can be named too. */
    char path[256];
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    assert_int_equal(rlb__st_open(path, &ck, err, sizeof(err)), 0);
    assert_int_equal(rlb__st_count(ck), 5);
    rlb__st_close(ck);

    /* A damaged file is refused with its path in the message. */
    save_blob(dir, "model.safetensors", make_file(SINGLE_JSON, data, 30));
    assert_int_equal(rlb__st_open(dir, &ck, err, sizeof(err)), RLB_EINVAL);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "'pos'"));
    save(dir, "model.safetensors", "", 0);
    assert_int_equal(rlb__st_open(dir, &ck, err, sizeof(err)), RLB_EINVAL);
    assert_non_null(strstr(err, "truncated"));
    snprintf(path, sizeof(path), "%s/nothing-here", dir);
    assert_int_equal(rlb__st_open(path, &ck, err, sizeof(err)), RLB_ENOTFOUND);
    rlb__st_close(NULL);
    remove_dir(dir);
}

/* Two shards: file 1 holds "a" (F32 [2]) and "c" (U8 [3]); file 2 holds "b" (BF16 [2,1]). */
static void save_shards(const char *dir)
{
    const float a[2] = {7.0f, -7.0f};
    unsigned char d1[11];
    memcpy(d1, a, 8);
    memcpy(d1 + 8, "xyz", 3);
    save_blob(dir, "model-00001-of-00002.safetensors",
              make_file("{\"c\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[8,11]},"
                        "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                        d1, sizeof(d1)));
    const uint16_t b[2] = {0x4040, 0x4080}; /* bf16 3, 4 */
    save_blob(dir, "model-00002-of-00002.safetensors",
              make_file("{\"b\":{\"dtype\":\"BF16\",\"shape\":[2,1],\"data_offsets\":[0,4]}}", b,
                        4));
}

static void save_index(const char *dir, const char *weight_map)
{
    char text[1024];
    snprintf(text, sizeof(text),
             "{\"metadata\": {\"total_size\": 15}, \"weight_map\": %s}", weight_map);
    save(dir, "model.safetensors.index.json", text, strlen(text));
}

#define SHARD1 "\"model-00001-of-00002.safetensors\""
#define SHARD2 "\"model-00002-of-00002.safetensors\""

static void test_open_sharded(void **state)
{
    char *dir = make_dir();
    save_shards(dir);
    save_index(dir, "{\"a\": " SHARD1 ", \"b\": " SHARD2 ", \"c\": " SHARD1 "}");
    rlb_st_checkpoint *ck = NULL;
    char err[256] = "";
    assert_int_equal(rlb__st_open(dir, &ck, err, sizeof(err)), 0);
    assert_int_equal(rlb__st_count(ck), 3);
    assert_int_equal(rlb__st_file_count(ck), 2);
    const char *order[] = {"a", "b", "c"};
    for (size_t i = 0; i < 3; i++)
        assert_string_equal(rlb__st_at(ck, i)->name, order[i]);
    const rlb_st_tensor *a = rlb__st_find(ck, "a"), *b = rlb__st_find(ck, "b"),
                        *c = rlb__st_find(ck, "c");
    assert_non_null(a);
    assert_non_null(b);
    assert_non_null(c);
    assert_int_equal(a->file, c->file);
    assert_int_not_equal(a->file, b->file);
    float av[2];
    memcpy(av, a->data, 8);
    assert_true(av[0] == 7.0f && av[1] == -7.0f);
    assert_memory_equal(c->data, "xyz", 3);
    uint16_t bv[2];
    memcpy(bv, b->data, 4);
    assert_int_equal(bv[0], 0x4040);
    assert_int_equal(bv[1], 0x4080);
    assert_int_equal(b->ndim, 2);
    assert_int_equal(b->shape[0], 2);
    assert_int_equal(b->shape[1], 1);
    const unsigned char *base = rlb__st_file_base(ck, b->file, NULL);
    assert_ptr_equal(base + b->file_offset, b->data);
    rlb__st_close(ck);
    remove_dir(dir);
}

static void expect_open_fail(const char *dir, int code, const char *needle)
{
    rlb_st_checkpoint *ck = NULL;
    char err[512] = "";
    int rc = rlb__st_open(dir, &ck, err, sizeof(err));
    if (rc != code || !strstr(err, needle))
        print_error("rc %d (want %d), err '%s' (want '%s')\n", rc, code, err, needle);
    assert_int_equal(rc, code);
    assert_non_null(strstr(err, needle));
    assert_null(ck);
}

static void test_sharded_failures(void **state)
{
    char *dir = make_dir();
    save_shards(dir);
    /* The index names a shard that is not there. */
    save_index(dir, "{\"a\": " SHARD1 ", \"b\": \"model-00003-of-00003.safetensors\", \"c\": "
                    SHARD1 "}");
    expect_open_fail(dir, RLB_ENOTFOUND, "model-00003-of-00003.safetensors");
    /* The index puts a tensor in the wrong file. */
    save_index(dir, "{\"a\": " SHARD2 ", \"b\": " SHARD2 ", \"c\": " SHARD1 "}");
    expect_open_fail(dir, RLB_EINVAL, "weight_map puts tensor 'a' in model-00002");
    /* A shard holds a tensor the index does not list. */
    save_index(dir, "{\"a\": " SHARD1 ", \"b\": " SHARD2 "}");
    expect_open_fail(dir, RLB_EINVAL, "tensor 'c' of model-00001-of-00002.safetensors is not");
    /* The index lists a tensor no shard holds. */
    save_index(dir, "{\"a\": " SHARD1 ", \"b\": " SHARD2 ", \"c\": " SHARD1 ", \"d\": " SHARD2
                    "}");
    expect_open_fail(dir, RLB_ENOTFOUND, "tensor 'd'");
    /* Shard names must stay inside the directory. */
    save_index(dir, "{\"a\": \"../model-00001-of-00002.safetensors\"}");
    expect_open_fail(dir, RLB_EINVAL, "'a' must be a file name");
    save_index(dir, "{\"a\": 5}");
    expect_open_fail(dir, RLB_EINVAL, "'a' must be a file name");
    const char *no_map = "{\"metadata\": {}}";
    save(dir, "model.safetensors.index.json", no_map, strlen(no_map));
    expect_open_fail(dir, RLB_EINVAL, "'weight_map' missing");
    save(dir, "model.safetensors.index.json", "{\"weight_map\": {", 16);
    expect_open_fail(dir, RLB_EINVAL, "invalid JSON");
    /* The same tensor in two shards. */
    save_blob(dir, "model-00002-of-00002.safetensors",
              make_file("{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "q", 1));
    save_index(dir, "{\"a\": " SHARD1 ", \"c\": " SHARD2 "}");
    expect_open_fail(dir, RLB_EEXIST, "tensor 'a' is in both");
    /* A malformed shard is named. */
    save_blob(dir, "model-00002-of-00002.safetensors", make_file("{", NULL, 0));
    expect_open_fail(dir, RLB_EINVAL, "model-00002-of-00002.safetensors: safetensors: invalid");
    remove_dir(dir);
}

static void test_write(void **state)
{
    char *dir = make_dir();
    const float w[6] = {1, 2, 3, 4, 5, 6};
    const uint16_t hb[3] = {0x3f80, 0x4000, 0x4040};
    const int64_t shape_w[2] = {2, 3}, shape_b[1] = {3}, shape_e[2] = {4, 0};
    const unsigned char one = 0x7f;
    const rlb_st_write_tensor ts[] = {
        {"model.layers.0.mlp.down_proj.weight", RLB_DTYPE_F32, 2, shape_w, w},
        {"model.norm.weight", RLB_DTYPE_BF16, 1, shape_b, hb},
        {"empty", RLB_DTYPE_F16, 2, shape_e, NULL},
        {"scalar", RLB_DTYPE_I8, 0, NULL, &one},
    };
    char err[256] = "";
    char path[256];
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    assert_int_equal(rlb__st_write(path, ts, 4, err, sizeof(err)), 0);

    /* The bytes on disk: length prefix, data area 8-aligned, tensors in the given order. */
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    unsigned char buf[4096];
    size_t len = fread(buf, 1, sizeof(buf), f);
    fclose(f);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | buf[i];
    assert_int_equal((8 + hlen) % 8, 0);
    assert_int_equal(len, 8 + hlen + 24 + 6 + 0 + 1);
    assert_int_equal(buf[8], '{');
    assert_memory_equal(buf + 8 + hlen, w, 24);
    assert_memory_equal(buf + 8 + hlen + 24, hb, 6);
    assert_int_equal(buf[8 + hlen + 30], 0x7f);

    rlb_st_checkpoint *ck = NULL;
    assert_int_equal(rlb__st_open(dir, &ck, err, sizeof(err)), 0);
    assert_int_equal(rlb__st_count(ck), 4);
    const rlb_st_tensor *t = rlb__st_find(ck, "model.norm.weight");
    assert_non_null(t);
    assert_int_equal(t->dtype, RLB_DTYPE_BF16);
    assert_int_equal(t->file_offset, 8 + hlen + 24);
    t = rlb__st_find(ck, "scalar");
    assert_int_equal(t->ndim, 0);
    assert_int_equal(t->nbytes, 1);
    rlb__st_close(ck);

    /* Bad input to the writer. */
    const rlb_st_write_tensor dup[] = {ts[0], ts[0]};
    assert_int_equal(rlb__st_write(path, dup, 2, err, sizeof(err)), RLB_EINVAL);
    assert_non_null(strstr(err, "duplicate tensor name 'model.layers.0.mlp.down_proj.weight'"));
    const int64_t neg[1] = {-1};
    rlb_st_write_tensor bad = {"x", RLB_DTYPE_F32, 1, neg, w};
    assert_int_equal(rlb__st_write(path, &bad, 1, err, sizeof(err)), RLB_EINVAL);
    assert_non_null(strstr(err, "'x'"));
    bad = (rlb_st_write_tensor){"x", RLB_DTYPE_COUNT_, 1, shape_b, w};
    assert_int_equal(rlb__st_write(path, &bad, 1, err, sizeof(err)), RLB_EINVAL);
    const int64_t huge[2] = {INT64_MAX, 4};
    bad = (rlb_st_write_tensor){"x", RLB_DTYPE_F32, 2, huge, w};
    assert_int_equal(rlb__st_write(path, &bad, 1, err, sizeof(err)), RLB_ETOOBIG);
    bad = (rlb_st_write_tensor){"__metadata__", RLB_DTYPE_F32, 1, shape_b, w};
    assert_int_equal(rlb__st_write(path, &bad, 1, err, sizeof(err)), RLB_EINVAL);
    bad = (rlb_st_write_tensor){"\xff\xfe", RLB_DTYPE_F32, 1, shape_b, w};
    assert_int_equal(rlb__st_write(path, &bad, 1, err, sizeof(err)), RLB_EINVAL);
    char nodir[300];
    snprintf(nodir, sizeof(nodir), "%s/no/such/file", dir);
    assert_int_equal(rlb__st_write(nodir, ts, 1, err, sizeof(err)), RLB_EIO);
    remove_dir(dir);
}

static void test_write_sharded(void **state)
{
    char *dir = make_dir();
    const float x[4] = {1, 2, 3, 4};
    const int64_t s2[1] = {2};
    const rlb_st_write_tensor s1t[] = {{"lm_head.weight", RLB_DTYPE_F32, 1, s2, x}};
    const rlb_st_write_tensor s2t[] = {{"model.embed_tokens.weight", RLB_DTYPE_F32, 1, s2,
                                        x + 2}};
    char path[256], err[256] = "";
    snprintf(path, sizeof(path), "%s/part-1.safetensors", dir);
    assert_int_equal(rlb__st_write(path, s1t, 1, err, sizeof(err)), 0);
    snprintf(path, sizeof(path), "%s/part-2.safetensors", dir);
    assert_int_equal(rlb__st_write(path, s2t, 1, err, sizeof(err)), 0);
    const char *names[] = {"model.embed_tokens.weight", "lm_head.weight"};
    const char *files[] = {"part-2.safetensors", "part-1.safetensors"};
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    assert_int_equal(rlb__st_write_index(path, names, files, 2, err, sizeof(err)), 0);
    rlb_st_checkpoint *ck = NULL;
    assert_int_equal(rlb__st_open(dir, &ck, err, sizeof(err)), 0);
    assert_int_equal(rlb__st_file_count(ck), 2);
    const rlb_st_tensor *e = rlb__st_find(ck, "model.embed_tokens.weight");
    assert_non_null(e);
    assert_memory_equal(e->data, x + 2, 8);
    rlb__st_close(ck);
    const char *dup_names[] = {"a", "a"};
    assert_int_equal(rlb__st_write_index(path, dup_names, files, 2, err, sizeof(err)),
                     RLB_EINVAL);
    remove_dir(dir);
}

static const char *corpus_dir; /* argv[1]: files written by the reference library */

static uint64_t fnv1a(const void *p, uint64_t n)
{
    const unsigned char *b = p;
    uint64_t h = 1469598103934665603ull;
    for (uint64_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 1099511628211ull;
    return h;
}

static void test_reference_writer_file(void **state)
{
    if (!corpus_dir)
        skip();
    static const struct {
        const char *name;
        rlb_dtype dtype;
        int ndim;
        int64_t shape[2];
        uint64_t nbytes, fnv;
    } want[] = {
        {"a.u8", RLB_DTYPE_U8, 1, {3}, 3, 0xa940e14f3a8f72beull},
        {"b.f32", RLB_DTYPE_F32, 2, {3, 5}, 60, 0xd0d44e0e63cf43d3ull},
        {"c.bf16", RLB_DTYPE_BF16, 1, {7}, 14, 0x8175e660af4a7feeull},
        {"d.f16", RLB_DTYPE_F16, 2, {2, 3}, 12, 0xae31ecae28296dfeull},
        {"e.fp8", RLB_DTYPE_F8E4M3, 1, {5}, 5, 0x16e5587874a48e8dull},
        {"f.i8", RLB_DTYPE_I8, 1, {3}, 3, 0x6ca9314f1840f68dull},
        {"g.i32", RLB_DTYPE_I32, 1, {2}, 8, 0x5b99422fbc5e8bafull},
        {"h.i64", RLB_DTYPE_I64, 1, {1}, 8, 0x7b869f7d1a7295e8ull},
        {"i.empty", RLB_DTYPE_F32, 2, {0, 4}, 0, 0x14650fb0739d0383ull},
        {"j.scalar", RLB_DTYPE_F32, 0, {0}, 4, 0x30e7c6a0864638d3ull},
    };
    char path[512], err[256] = "";
    snprintf(path, sizeof(path), "%s/reference_writer.safetensors", corpus_dir);
    rlb_st_checkpoint *ck = NULL;
    int rc = rlb__st_open(path, &ck, err, sizeof(err));
    if (rc)
        print_error("%s: %s\n", path, err);
    assert_int_equal(rc, 0);
    assert_int_equal(rlb__st_count(ck), 10);
    for (size_t i = 0; i < 10; i++) {
        const rlb_st_tensor *t = rlb__st_at(ck, i);
        assert_string_equal(t->name, want[i].name);
        assert_int_equal(t->dtype, want[i].dtype);
        assert_int_equal(t->ndim, want[i].ndim);
        for (int d = 0; d < t->ndim; d++)
            assert_int_equal(t->shape[d], want[i].shape[d]);
        assert_int_equal(t->nbytes, want[i].nbytes);
        assert_int_equal(fnv1a(t->data, t->nbytes), want[i].fnv);
    }
    rlb__st_close(ck);
}

int main(int argc, char **argv)
{
    corpus_dir = argc > 1 ? argv[1] : NULL;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_valid),     cmocka_unit_test(test_unaligned),
        cmocka_unit_test(test_parse_failures),  cmocka_unit_test(test_open_single),
        cmocka_unit_test(test_open_sharded),    cmocka_unit_test(test_sharded_failures),
        cmocka_unit_test(test_write),           cmocka_unit_test(test_write_sharded),
        cmocka_unit_test(test_reference_writer_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
