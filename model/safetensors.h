/* safetensors.h: reading and writing HF safetensors checkpoints.
 *
 * A .safetensors file is an 8-byte little-endian header length N, N bytes of JSON
 * ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}),
 * then the data area. rlb__st_parse is a pure function of (buffer, length) so a fuzzer can
 * drive it: it accepts a file only when every tensor has a known dtype, a non-negative
 * shape whose byte size equals end - begin, offsets inside the data area, and the tensors,
 * sorted by begin, tile the data area exactly (no gap, no overlap, nothing after the last).
 *
 * A checkpoint is a directory holding either model.safetensors or a sharded set described
 * by model.safetensors.index.json ({"weight_map": {name: file}}); rlb__st_open maps every
 * file once, read-only, and looks tensors up by name across files.
 *
 * Alignment: a tensor's bytes may start at any byte offset of the file (the format does not
 * align them). rlb_st_tensor.data is therefore NOT aligned for its dtype: readers must
 * memcpy the elements out (or use unaligned loads), never dereference it as float* etc.
 *
 * Every function returns 0 or a negative RLB_E* code; `err` (may be NULL) receives a
 * sentence naming the file, tensor or field at fault.
 */
#ifndef RLB_MODEL_SAFETENSORS_H
#define RLB_MODEL_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "rlb/rlb.h"

#define RLB_ST_MAX_DIMS 8                     /* tensors of more dimensions are refused */
#define RLB_ST_MAX_HEADER (100u * 1000u * 1000u) /* largest JSON header accepted, bytes */

/* One tensor of a parsed file or an opened checkpoint. */
typedef struct rlb_st_tensor {
    const char *name;                /* NUL-terminated; lives as long as its owner */
    rlb_dtype dtype;                 /* element type */
    int32_t ndim;                    /* 0 (a scalar) .. RLB_ST_MAX_DIMS */
    int64_t shape[RLB_ST_MAX_DIMS];  /* first ndim entries used; >= 0 */
    const void *data;                /* first byte, NOT aligned (see above) */
    uint64_t nbytes;                 /* product of shape * dtype size */
    uint32_t file;                   /* checkpoint file holding it (0 for a parsed buffer) */
    uint64_t file_offset;            /* byte offset of data in that file */
} rlb_st_tensor;

/* The result of parsing one file's bytes. Tensors point into the parsed buffer, which must
 * outlive the header. */
typedef struct rlb_st_header {
    uint64_t data_start;    /* 8 + N: file offset where the data area begins */
    uint64_t data_bytes;    /* size of the data area (the rest of the buffer) */
    size_t n_tensors;       /* entries in tensors[] */
    rlb_st_tensor *tensors; /* sorted by name (strcmp) */
    char *names;            /* storage of every name, freed with the header */
} rlb_st_header;

/* Parses and validates a whole safetensors file held in buf[0..len). On success fills
 * `hdr` (free with rlb__st_header_free). Returns 0, RLB_EINVAL (truncated, bad JSON, bad
 * field, offsets wrong), RLB_ETOOBIG (header over RLB_ST_MAX_HEADER), RLB_EDTYPE (unknown
 * dtype, named), RLB_EEXIST (duplicate tensor name), RLB_EUNSUPPORTED (more than
 * RLB_ST_MAX_DIMS dimensions) or RLB_ENOMEM. */
int rlb__st_parse(const void *buf, size_t len, rlb_st_header *hdr, char *err, size_t errlen);
/* Frees what rlb__st_parse allocated; safe on a zeroed or already freed header. */
void rlb__st_header_free(rlb_st_header *hdr);

/* ---- Checkpoints: one or more mapped files ---------------------------------------------- */

typedef struct rlb_st_checkpoint rlb_st_checkpoint; /* opaque */

/* Opens `path`: a directory with model.safetensors.index.json (sharded) or
 * model.safetensors, or a single .safetensors file. Every file is mapped read-only once.
 * Returns 0, RLB_ENOTFOUND (no checkpoint there, or a shard the index names is missing),
 * RLB_EIO, RLB_ENOMEM, RLB_EEXIST (a tensor in two shards), RLB_EINVAL (a malformed file
 * or index, or an index that disagrees with its shards), or a code from rlb__st_parse. */
int rlb__st_open(const char *path, rlb_st_checkpoint **out, char *err, size_t errlen);
/* Unmaps every file and frees the handle (NULL is accepted). Tensor pointers die with it. */
void rlb__st_close(rlb_st_checkpoint *ckpt);
/* Number of tensors across all files. */
size_t rlb__st_count(const rlb_st_checkpoint *ckpt);
/* Tensor i (0 <= i < count) in name order, or NULL when i is out of range. */
const rlb_st_tensor *rlb__st_at(const rlb_st_checkpoint *ckpt, size_t i);
/* The tensor called `name`, or NULL when the checkpoint has none. */
const rlb_st_tensor *rlb__st_find(const rlb_st_checkpoint *ckpt, const char *name);
/* Number of mapped files (1 for a single-file checkpoint). */
uint32_t rlb__st_file_count(const rlb_st_checkpoint *ckpt);
/* Base address and length of mapped file i (rlb_st_tensor.file), so a file can serve as one
 * plan source: tensor bytes are at base + file_offset. Returns NULL for a bad index. */
const void *rlb__st_file_base(const rlb_st_checkpoint *ckpt, uint32_t i, uint64_t *len);

/* ---- Writing -------------------------------------------------------------------------- */

/* One tensor to write; its byte size is the product of shape times the dtype size. */
typedef struct rlb_st_write_tensor {
    const char *name;      /* unique within the file */
    rlb_dtype dtype;       /* element type */
    int32_t ndim;          /* 0 .. RLB_ST_MAX_DIMS */
    const int64_t *shape;  /* [ndim], each >= 0 */
    const void *data;      /* the elements, row-major; may be NULL when the size is 0 */
} rlb_st_write_tensor;

/* Writes one .safetensors file at `path` (created or truncated) holding the tensors in the
 * given order, with "__metadata__": {"format": "pt"} as HF writes it and the header padded
 * with spaces so the data area starts 8-byte aligned. Returns 0, RLB_EINVAL (bad name,
 * shape or dtype; duplicate names), RLB_ETOOBIG (sizes overflow) or RLB_EIO. */
int rlb__st_write(const char *path, const rlb_st_write_tensor *tensors, size_t n, char *err,
                  size_t errlen);
/* Writes model.safetensors.index.json at `path`: weight_map[names[i]] = files[i]. Returns 0,
 * RLB_EINVAL (duplicate names) or RLB_EIO. */
int rlb__st_write_index(const char *path, const char *const *names, const char *const *files,
                        size_t n, char *err, size_t errlen);

#endif /* RLB_MODEL_SAFETENSORS_H */
