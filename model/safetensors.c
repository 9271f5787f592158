/* safetensors.c: the safetensors header parser, checkpoint opening (single file or sharded
 * through model.safetensors.index.json, every file mapped once, read-only) and the writer.
 *
 * The parser trusts nothing in the file: every size is checked against the buffer before
 * it is used, products are computed with overflow checks, and the tensors must tile the
 * data area exactly, which is what makes each tensor's [data, data + nbytes) safe to read
 * without further checks. Errors are sentences naming the tensor or field at fault.
 */
#include "model/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/check.h"
#include "model/config.h"

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
#define METADATA_KEY "__metadata__"

/* ---- Parsing ---------------------------------------------------------------------------- */

static uint64_t load_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* dtype as safetensors spells it; rlb_dtype_name uses the same spelling. */
static int dtype_from_name(const char *name, rlb_dtype *out)
{
    for (int d = 0; d < RLB_DTYPE_COUNT_; d++) {
        if (strcmp(name, rlb_dtype_name((rlb_dtype)d)) == 0) {
            *out = (rlb_dtype)d;
            return 0;
        }
    }
    return RLB_EDTYPE;
}

/* Byte size of a tensor: product of shape times esz. Returns 0, or RLB_ETOOBIG when the
 * product does not fit in 64 bits. */
static int tensor_bytes(const int64_t *shape, int ndim, size_t esz, uint64_t *out)
{
    uint64_t n = esz;
    for (int i = 0; i < ndim; i++)
        if (__builtin_mul_overflow(n, (uint64_t)shape[i], &n))
            return RLB_ETOOBIG;
    *out = n;
    return 0;
}

/* Reads a JSON array of non-negative integers into out[max]; returns the count, or -1 when
 * `v` is not such an array or has more than max entries. */
static int read_u64_array(const json_t *v, int64_t *out, size_t max)
{
    if (!json_is_array(v) || json_array_size(v) > max)
        return -1;
    size_t i;
    json_t *e;
    json_array_foreach(v, i, e) {
        if (!json_is_integer(e) || json_integer_value(e) < 0)
            return -1;
        out[i] = (int64_t)json_integer_value(e);
    }
    return (int)json_array_size(v);
}

static int check_metadata(const json_t *meta, char *err, size_t errlen)
{
    if (!json_is_object(meta))
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: '" METADATA_KEY "' must be an object");
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)meta, key, v) {
        if (!json_is_string(v))
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "safetensors: '" METADATA_KEY ".%s' must be a string", key);
    }
    return 0;
}

/* Fills t from one header entry {"dtype", "shape", "data_offsets"}; offsets are checked
 * against the data area here, tiling later. */
static int parse_entry(const char *name, const json_t *v, uint64_t data_bytes,
                       rlb_st_tensor *t, uint64_t *begin, char *err, size_t errlen)
{
    if (!json_is_object(v))
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: entry of tensor '%s' must be an object", name);
    json_t *dtype = json_object_get(v, "dtype");
    if (!json_is_string(dtype))
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: tensor '%s': 'dtype' missing or not a string",
                              name);
    if (dtype_from_name(json_string_value(dtype), &t->dtype) < 0)
        return rlb__model_err(err, errlen, RLB_EDTYPE,
                              "safetensors: tensor '%s': unsupported dtype '%s'", name,
                              json_string_value(dtype));
    json_t *shape = json_object_get(v, "shape");
    if (json_is_array(shape) && json_array_size(shape) > RLB_ST_MAX_DIMS)
        return rlb__model_err(err, errlen, RLB_EUNSUPPORTED,
                              "safetensors: tensor '%s' has %zu dimensions (at most %d)", name,
                              json_array_size(shape), RLB_ST_MAX_DIMS);
    int ndim = read_u64_array(shape, t->shape, RLB_ST_MAX_DIMS);
    if (ndim < 0)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: tensor '%s': 'shape' must be an array of "
                              "non-negative integers",
                              name);
    t->ndim = ndim;
    int64_t off[2];
    if (read_u64_array(json_object_get(v, "data_offsets"), off, 2) != 2)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: tensor '%s': 'data_offsets' must be [begin, end] "
                              "of non-negative integers",
                              name);
    if (off[0] > off[1] || (uint64_t)off[1] > data_bytes)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: tensor '%s': data_offsets [%lld, %lld] are not "
                              "inside the data area of %llu bytes",
                              name, (long long)off[0], (long long)off[1],
                              (unsigned long long)data_bytes);
    if (tensor_bytes(t->shape, ndim, rlb_dtype_size(t->dtype), &t->nbytes) < 0)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: tensor '%s': shape size overflows", name);
    if (t->nbytes != (uint64_t)(off[1] - off[0]))
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: tensor '%s': shape x %s is %llu bytes but "
                              "data_offsets span %lld",
                              name, rlb_dtype_name(t->dtype), (unsigned long long)t->nbytes,
                              (long long)(off[1] - off[0]));
    *begin = (uint64_t)off[0];
    return 0;
}

static int cmp_by_offset(const void *a, const void *b)
{
    const rlb_st_tensor *x = a, *y = b;
    if (x->file_offset != y->file_offset)
        return x->file_offset < y->file_offset ? -1 : 1;
    if (x->nbytes != y->nbytes)
        return x->nbytes < y->nbytes ? -1 : 1;
    return 0;
}

static int cmp_by_name(const void *a, const void *b)
{
    return strcmp(((const rlb_st_tensor *)a)->name, ((const rlb_st_tensor *)b)->name);
}

/* Sorted by begin, the tensors must follow each other without gap or overlap and end
 * exactly at the end of the data area. Sorts `t` by offset. */
static int check_tiling(rlb_st_tensor *t, size_t n, uint64_t data_start, uint64_t data_bytes,
                        char *err, size_t errlen)
{
    qsort(t, n, sizeof(*t), cmp_by_offset);
    uint64_t pos = data_start;
    for (size_t i = 0; i < n; i++) {
        if (t[i].file_offset != pos)
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "safetensors: tensor '%s' starts at data offset %llu, "
                                  "expected %llu (%s)",
                                  t[i].name,
                                  (unsigned long long)(t[i].file_offset - data_start),
                                  (unsigned long long)(pos - data_start),
                                  t[i].file_offset > pos ? "a gap before it"
                                                         : "it overlaps the previous one");
        pos += t[i].nbytes;
    }
    if (pos != data_start + data_bytes)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: %llu bytes after the last tensor are not "
                              "covered by any tensor",
                              (unsigned long long)(data_start + data_bytes - pos));
    return 0;
}

/* Fills hdr from the parsed JSON object; the caller frees hdr on failure. */
static int parse_tensors(const unsigned char *base, json_t *root, rlb_st_header *hdr,
                         char *err, size_t errlen)
{
    size_t names_bytes = 0, n = 0;
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (strcmp(key, METADATA_KEY) == 0) {
            int rc = check_metadata(v, err, errlen);
            if (rc < 0)
                return rc;
            continue;
        }
        names_bytes += strlen(key) + 1;
        n++;
    }
    hdr->tensors = calloc(n ? n : 1, sizeof(*hdr->tensors));
    hdr->names = malloc(names_bytes ? names_bytes : 1);
    if (!hdr->tensors || !hdr->names)
        return rlb__model_err(err, errlen, RLB_ENOMEM, "safetensors: out of memory");
    char *name_at = hdr->names;
    json_object_foreach(root, key, v) {
        if (strcmp(key, METADATA_KEY) == 0)
            continue;
        rlb_st_tensor *t = &hdr->tensors[hdr->n_tensors++];
        size_t klen = strlen(key) + 1;
        memcpy(name_at, key, klen);
        t->name = name_at;
        name_at += klen;
        uint64_t begin = 0;
        int rc = parse_entry(key, v, hdr->data_bytes, t, &begin, err, errlen);
        if (rc < 0)
            return rc;
        t->file_offset = hdr->data_start + begin;
        t->data = base + t->file_offset;
    }
    int rc = check_tiling(hdr->tensors, n, hdr->data_start, hdr->data_bytes, err, errlen);
    if (rc < 0)
        return rc;
    qsort(hdr->tensors, n, sizeof(*hdr->tensors), cmp_by_name);
    return 0;
}

int rlb__st_parse(const void *buf, size_t len, rlb_st_header *hdr, char *err, size_t errlen)
{
    if (!hdr || (!buf && len))
        return rlb__model_err(err, errlen, RLB_EINVAL, "safetensors: NULL argument");
    *hdr = (rlb_st_header){0};
    const unsigned char *base = buf;
    if (len < 8)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: truncated: %zu bytes, less than the 8-byte "
                              "header length",
                              len);
    uint64_t hlen = load_le64(base);
    if (hlen > RLB_ST_MAX_HEADER)
        return rlb__model_err(err, errlen, RLB_ETOOBIG,
                              "safetensors: header of %llu bytes is over the %u-byte limit",
                              (unsigned long long)hlen, RLB_ST_MAX_HEADER);
    if (hlen > len - 8)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors: truncated: header of %llu bytes but only %zu "
                              "bytes follow the length",
                              (unsigned long long)hlen, len - 8);
    hdr->data_start = 8 + hlen;
    hdr->data_bytes = len - hdr->data_start;

    json_error_t jerr;
    json_t *root = json_loadb((const char *)base + 8, hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        int dup = json_error_code(&jerr) == json_error_duplicate_key;
        return rlb__model_err(err, errlen, dup ? RLB_EEXIST : RLB_EINVAL,
                              "safetensors: %s in the header at byte %d: %s",
                              dup ? "duplicate name" : "invalid JSON", jerr.position,
                              jerr.text);
    }
    int rc;
    if (!json_is_object(root))
        rc = rlb__model_err(err, errlen, RLB_EINVAL,
                            "safetensors: the header must be a JSON object");
    else
        rc = parse_tensors(base, root, hdr, err, errlen);
    json_decref(root);
    if (rc < 0)
        rlb__st_header_free(hdr);
    return rc;
}

void rlb__st_header_free(rlb_st_header *hdr)
{
    if (!hdr)
        return;
    free(hdr->tensors);
    free(hdr->names);
    *hdr = (rlb_st_header){0};
}

/* ---- Checkpoints ------------------------------------------------------------------------ */

typedef struct st_file {
    char *name;        /* file name inside the checkpoint directory (or the path given) */
    void *map;         /* read-only private mapping, NULL for an empty file */
    uint64_t len;      /* file size in bytes */
    rlb_st_header hdr; /* its parsed header; tensors point into map */
} st_file;

struct rlb_st_checkpoint {
    uint32_t n_files;       /* entries in files[] */
    st_file *files;         /* every mapped file, in first-mention order */
    size_t n_tensors;       /* entries in tensors[] */
    rlb_st_tensor *tensors; /* all files' tensors, sorted by name, .file set */
};

/* Maps and parses `path` into f. Returns 0 or a negative code; messages name the path. */
static int map_file(const char *path, st_file *f, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return rlb__model_err(err, errlen, errno == ENOENT ? RLB_ENOTFOUND : RLB_EIO,
                              "%s: %s", path, strerror(errno));
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        rc = rlb__model_err(err, errlen, RLB_EIO, "%s: not a readable regular file", path);
        goto out;
    }
    f->len = (uint64_t)st.st_size;
    if (f->len) {
        void *map = mmap(NULL, f->len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            rc = rlb__model_err(err, errlen, errno == ENOMEM ? RLB_ENOMEM : RLB_EIO,
                                "%s: mmap: %s", path, strerror(errno));
            goto out;
        }
        f->map = map;
    }
    char msg[512];
    rc = rlb__st_parse(f->map, f->len, &f->hdr, msg, sizeof(msg));
    if (rc < 0)
        rlb__model_err(err, errlen, rc, "%s: %s", path, msg);
out:
    close(fd);
    return rc;
}

void rlb__st_close(rlb_st_checkpoint *ckpt)
{
    if (!ckpt)
        return;
    for (uint32_t i = 0; i < ckpt->n_files; i++) {
        st_file *f = &ckpt->files[i];
        rlb__st_header_free(&f->hdr);
        if (f->map)
            munmap(f->map, f->len);
        free(f->name);
    }
    free(ckpt->files);
    free(ckpt->tensors);
    free(ckpt);
}

static char *join_path(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* Adds file `name` of directory `dir` (dir NULL: name is the path) as files[n_files]. */
static int add_file(rlb_st_checkpoint *ck, const char *dir, const char *name, char *err,
                    size_t errlen)
{
    st_file *f = &ck->files[ck->n_files];
    *f = (st_file){0};
    f->name = strdup(name);
    char *path = dir ? join_path(dir, name) : strdup(name);
    int rc = (f->name && path) ? map_file(path, f, err, errlen)
                               : rlb__model_err(err, errlen, RLB_ENOMEM, "out of memory");
    free(path);
    /* Counted even on failure so rlb__st_close releases what map_file set up. */
    ck->n_files++;
    return rc;
}

/* Merges every file's tensors into one name-sorted table; a name in two files is
 * RLB_EEXIST. */
static int merge_tensors(rlb_st_checkpoint *ck, char *err, size_t errlen)
{
    size_t n = 0;
    for (uint32_t i = 0; i < ck->n_files; i++)
        n += ck->files[i].hdr.n_tensors;
    ck->tensors = calloc(n ? n : 1, sizeof(*ck->tensors));
    if (!ck->tensors)
        return rlb__model_err(err, errlen, RLB_ENOMEM, "safetensors: out of memory");
    for (uint32_t i = 0; i < ck->n_files; i++) {
        for (size_t j = 0; j < ck->files[i].hdr.n_tensors; j++) {
            rlb_st_tensor *t = &ck->tensors[ck->n_tensors++];
            *t = ck->files[i].hdr.tensors[j];
            t->file = i;
        }
    }
    qsort(ck->tensors, n, sizeof(*ck->tensors), cmp_by_name);
    for (size_t i = 1; i < n; i++)
        if (strcmp(ck->tensors[i - 1].name, ck->tensors[i].name) == 0)
            return rlb__model_err(err, errlen, RLB_EEXIST,
                                  "safetensors: tensor '%s' is in both %s and %s",
                                  ck->tensors[i].name,
                                  ck->files[ck->tensors[i - 1].file].name,
                                  ck->files[ck->tensors[i].file].name);
    return 0;
}

/* A shard named by the index must be a plain file name inside the checkpoint directory. */
static int plain_file_name(const char *s)
{
    return s[0] && !strchr(s, '/') && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

/* Every tensor of the shards is in the weight map, in the file the map names, and the map
 * names no tensor the shards lack. */
static int check_index(const rlb_st_checkpoint *ck, const json_t *map, const char *index,
                       char *err, size_t errlen)
{
    for (size_t i = 0; i < ck->n_tensors; i++) {
        const rlb_st_tensor *t = &ck->tensors[i];
        const char *want = json_string_value(json_object_get(map, t->name));
        if (!want)
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "%s: tensor '%s' of %s is not in the weight_map", index,
                                  t->name, ck->files[t->file].name);
        if (strcmp(want, ck->files[t->file].name) != 0)
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "%s: weight_map puts tensor '%s' in %s but it is in %s",
                                  index, t->name, want, ck->files[t->file].name);
    }
    const char *name;
    json_t *v;
    json_object_foreach((json_t *)map, name, v) {
        if (!rlb__st_find(ck, name))
            return rlb__model_err(err, errlen, RLB_ENOTFOUND,
                                  "%s: weight_map names tensor '%s' but %s does not hold it",
                                  index, name, json_string_value(v));
    }
    return 0;
}

/* Opens every shard the index names, each once. */
static int open_sharded(rlb_st_checkpoint *ck, const char *dir, const char *index,
                        char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_load_file(index, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return rlb__model_err(err, errlen, RLB_EINVAL, "%s: invalid JSON at line %d: %s",
                              index, jerr.line, jerr.text);
    int rc = 0;
    json_t *map = json_object_get(root, "weight_map");
    if (!json_is_object(map)) {
        rc = rlb__model_err(err, errlen, RLB_EINVAL,
                            "%s: 'weight_map' missing or not an object", index);
        goto out;
    }
    ck->files = calloc(json_object_size(map) ? json_object_size(map) : 1, sizeof(*ck->files));
    if (!ck->files) {
        rc = rlb__model_err(err, errlen, RLB_ENOMEM, "out of memory");
        goto out;
    }
    const char *name;
    json_t *v;
    json_object_foreach(map, name, v) {
        const char *file = json_string_value(v);
        if (!file || !plain_file_name(file)) {
            rc = rlb__model_err(err, errlen, RLB_EINVAL,
                                "%s: weight_map entry '%s' must be a file name in the "
                                "checkpoint directory",
                                index, name);
            goto out;
        }
        uint32_t i = 0;
        while (i < ck->n_files && strcmp(ck->files[i].name, file) != 0)
            i++;
        if (i == ck->n_files)
            RLB_CHECK_GOTO(add_file(ck, dir, file, err, errlen), rc, out);
    }
    RLB_CHECK_GOTO(merge_tensors(ck, err, errlen), rc, out);
    rc = check_index(ck, map, index, err, errlen);
out:
    json_decref(root);
    return rc;
}

static int is_regular(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int rlb__st_open(const char *path, rlb_st_checkpoint **out, char *err, size_t errlen)
{
    if (!path || !out)
        return rlb__model_err(err, errlen, RLB_EINVAL, "safetensors: NULL argument");
    *out = NULL;
    struct stat st;
    if (stat(path, &st) != 0)
        return rlb__model_err(err, errlen, errno == ENOENT ? RLB_ENOTFOUND : RLB_EIO,
                              "%s: %s", path, strerror(errno));
    rlb_st_checkpoint *ck = calloc(1, sizeof(*ck));
    char *index = join_path(path, INDEX_NAME);
    char *single = join_path(path, SINGLE_NAME);
    int rc = 0;
    if (!ck || !index || !single) {
        rc = rlb__model_err(err, errlen, RLB_ENOMEM, "out of memory");
        goto fail;
    }
    if (S_ISDIR(st.st_mode) && is_regular(index)) {
        RLB_CHECK_GOTO(open_sharded(ck, path, index, err, errlen), rc, fail);
    } else {
        int dir = S_ISDIR(st.st_mode);
        if (dir && !is_regular(single)) {
            rc = rlb__model_err(err, errlen, RLB_ENOTFOUND,
                                "%s: no " INDEX_NAME " or " SINGLE_NAME, path);
            goto fail;
        }
        ck->files = calloc(1, sizeof(*ck->files));
        if (!ck->files) {
            rc = rlb__model_err(err, errlen, RLB_ENOMEM, "out of memory");
            goto fail;
        }
        RLB_CHECK_GOTO(add_file(ck, dir ? path : NULL, dir ? SINGLE_NAME : path, err,
                                errlen),
                       rc, fail);
        RLB_CHECK_GOTO(merge_tensors(ck, err, errlen), rc, fail);
    }
    free(index);
    free(single);
    *out = ck;
    return 0;
fail:
    free(index);
    free(single);
    rlb__st_close(ck);
    return rc;
}

size_t rlb__st_count(const rlb_st_checkpoint *ckpt)
{
    return ckpt->n_tensors;
}

const rlb_st_tensor *rlb__st_at(const rlb_st_checkpoint *ckpt, size_t i)
{
    return i < ckpt->n_tensors ? &ckpt->tensors[i] : NULL;
}

const rlb_st_tensor *rlb__st_find(const rlb_st_checkpoint *ckpt, const char *name)
{
    rlb_st_tensor key = {.name = name};
    return bsearch(&key, ckpt->tensors, ckpt->n_tensors, sizeof(key), cmp_by_name);
}

uint32_t rlb__st_file_count(const rlb_st_checkpoint *ckpt)
{
    return ckpt->n_files;
}

const void *rlb__st_file_base(const rlb_st_checkpoint *ckpt, uint32_t i, uint64_t *len)
{
    if (i >= ckpt->n_files)
        return NULL;
    if (len)
        *len = ckpt->files[i].len;
    return ckpt->files[i].map;
}

/* ---- Writing ---------------------------------------------------------------------------- */

static int write_all(int fd, const void *buf, size_t n)
{
    const unsigned char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return RLB_EIO;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Checks one tensor to write and adds its header entry at data offset *pos. */
static int add_header_entry(json_t *root, const rlb_st_write_tensor *t, uint64_t *pos,
                            char *err, size_t errlen)
{
    if (!t->name || !t->name[0] || strcmp(t->name, METADATA_KEY) == 0)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors write: empty or reserved tensor name");
    if (json_object_get(root, t->name))
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors write: duplicate tensor name '%s'", t->name);
    size_t esz = rlb_dtype_size(t->dtype);
    if (!esz || t->ndim < 0 || t->ndim > RLB_ST_MAX_DIMS || (t->ndim && !t->shape))
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors write: tensor '%s': bad dtype or ndim", t->name);
    for (int i = 0; i < t->ndim; i++)
        if (t->shape[i] < 0)
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "safetensors write: tensor '%s': negative dimension",
                                  t->name);
    uint64_t nbytes, end;
    if (tensor_bytes(t->shape, t->ndim, esz, &nbytes) < 0 ||
        __builtin_add_overflow(*pos, nbytes, &end) || end > INT64_MAX)
        return rlb__model_err(err, errlen, RLB_ETOOBIG,
                              "safetensors write: tensor '%s' is too large", t->name);
    if (nbytes && !t->data)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors write: tensor '%s' has no data", t->name);
    json_t *shape = json_array();
    for (int i = 0; shape && i < t->ndim; i++)
        json_array_append_new(shape, json_integer(t->shape[i]));
    json_t *entry = json_pack("{s:s, s:o, s:[I,I]}", "dtype", rlb_dtype_name(t->dtype),
                              "shape", shape, "data_offsets", (json_int_t)*pos,
                              (json_int_t)end);
    if (!entry || json_object_set_new(root, t->name, entry) != 0)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "safetensors write: tensor '%s': name is not valid UTF-8 or "
                              "out of memory",
                              t->name);
    *pos = end;
    return 0;
}

int rlb__st_write(const char *path, const rlb_st_write_tensor *tensors, size_t n, char *err,
                  size_t errlen)
{
    if (!path || (n && !tensors))
        return rlb__model_err(err, errlen, RLB_EINVAL, "safetensors write: NULL argument");
    int rc = 0, fd = -1;
    char *text = NULL;
    json_t *root = json_pack("{s:{s:s}}", METADATA_KEY, "format", "pt");
    if (!root)
        return rlb__model_err(err, errlen, RLB_ENOMEM, "out of memory");
    uint64_t pos = 0;
    for (size_t i = 0; i < n; i++)
        RLB_CHECK_GOTO(add_header_entry(root, &tensors[i], &pos, err, errlen), rc, fail);
    text = json_dumps(root, JSON_COMPACT);
    if (!text) {
        rc = rlb__model_err(err, errlen, RLB_ENOMEM, "out of memory");
        goto fail;
    }
    /* Spaces after the JSON (allowed by the format) put the data area on an 8-byte
     * boundary, as the reference writer does. */
    size_t jlen = strlen(text), hlen = (jlen + 7) / 8 * 8;
    unsigned char prefix[8];
    for (int i = 0; i < 8; i++)
        prefix[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    static const char spaces[8] = "        ";
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = rlb__model_err(err, errlen, RLB_EIO, "%s: %s", path, strerror(errno));
        goto fail;
    }
    rc = write_all(fd, prefix, 8);
    if (!rc)
        rc = write_all(fd, text, jlen);
    if (!rc)
        rc = write_all(fd, spaces, hlen - jlen);
    for (size_t i = 0; !rc && i < n; i++) {
        uint64_t nbytes = 0;
        tensor_bytes(tensors[i].shape, tensors[i].ndim, rlb_dtype_size(tensors[i].dtype),
                     &nbytes);
        rc = write_all(fd, tensors[i].data, nbytes);
    }
    if (close(fd) != 0 && !rc)
        rc = RLB_EIO;
    fd = -1;
    if (rc < 0)
        rlb__model_err(err, errlen, rc, "%s: write failed: %s", path, strerror(errno));
fail:
    if (fd >= 0)
        close(fd);
    free(text);
    json_decref(root);
    return rc;
}

int rlb__st_write_index(const char *path, const char *const *names, const char *const *files,
                        size_t n, char *err, size_t errlen)
{
    if (!path || (n && (!names || !files)))
        return rlb__model_err(err, errlen, RLB_EINVAL, "safetensors index: NULL argument");
    json_t *map = json_object();
    json_t *root = json_pack("{s:o}", "weight_map", map);
    int rc = 0;
    if (!root)
        return rlb__model_err(err, errlen, RLB_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        if (!names[i] || !files[i] || json_object_get(map, names[i])) {
            rc = rlb__model_err(err, errlen, RLB_EINVAL,
                                "safetensors index: entry %zu is NULL or a duplicate", i);
            goto out;
        }
        if (json_object_set_new(map, names[i], json_string(files[i])) != 0) {
            rc = rlb__model_err(err, errlen, RLB_EINVAL,
                                "safetensors index: entry %zu is not valid UTF-8", i);
            goto out;
        }
    }
    if (json_dump_file(root, path, JSON_INDENT(2) | JSON_SORT_KEYS) != 0)
        rc = rlb__model_err(err, errlen, RLB_EIO, "%s: cannot write the index", path);
out:
    json_decref(root);
    return rc;
}
