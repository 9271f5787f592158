/* source.h: what the trainer ranks registered, i.e. where every element of every parameter
 * lives on the source side of a reshard (DESIGN §4, "FSDP1/FSDP2 source").
 *
 * A source is a table of buffers (each one registered memory region; its index is the
 * plan's src_ref) and, per parameter, its placement in them, added in any mix of:
 *   full   the whole tensor, row-major, at (buffer, offset): a checkpoint or an unsharded
 *          trainer.
 *   FSDP2  fully_shard / DTensor Shard(0) over W ranks: c = ceil(d0/W); rank f holds rows
 *          [f*c, f*c + n_f), n_f = max(0, min(c, d0 - f*c)), contiguous at its
 *          (buffer, offset). Uneven d0 is fine; ranks with n_f == 0 may name no buffer.
 *   FSDP1  one FlatParameter unit, described by the trainer's own metadata: its entries in
 *          flat order (parameter names, shapes, numels; padding entries have no name, as
 *          with use_orig_params=True where each parameter starts 16-byte aligned), the total
 *          padded to W * chunk_numel and split in W equal chunks; rank f's chunk is at its
 *          (buffer, offset). Nothing about the order is assumed: the metadata is the truth.
 * Every placement carries its own dtype (F32, BF16 or F16).
 *
 * Each add call checks its input against the parameter list before it changes anything
 * (on failure the source is as before the call) and reports, naming the tensor:
 *   RLB_ENOTFOUND unknown name          RLB_ESHAPE   shape differs from the config
 *   RLB_EEXIST    tensor added twice    RLB_EDTYPE   dtype not F32/BF16/F16
 *   RLB_EINVAL    bad buffer index, placement past the buffer's end, FSDP metadata that
 *                 does not add up (numel vs shape, chunk size vs W and total, ranks missing)
 * lm_head.weight of a model with tied embeddings, and the LoRA factors of a weight that has
 * no adapter in the parameter list (model/lora.h), are accepted and dropped (one info line).
 * rlb__source_check then reports a parameter nobody added (RLB_ENOTFOUND).
 *
 * Internally every placement becomes pieces: a run of consecutive elements of one parameter
 * (row-major index) stored contiguously in one buffer. The planner only sees pieces.
 */
#ifndef RLB_MODEL_SOURCE_H
#define RLB_MODEL_SOURCE_H

#include <stddef.h>
#include <stdint.h>

#include "model/params.h"
#include "rlb/rlb.h"

/* Buffer index of a rank that registered nothing (an FSDP2 rank with n_f == 0). */
#define RLB_SRC_NO_BUFFER UINT32_MAX

/* Where one rank's shard (FSDP2) or chunk (FSDP1) lives. */
typedef struct rlb_src_loc {
    uint32_t buffer; /* index from rlb__source_add_buffer, or RLB_SRC_NO_BUFFER */
    uint64_t offset; /* byte offset of the shard's first element in that buffer */
} rlb_src_loc;

/* One entry of an FSDP1 FlatParameter, in flat order. */
typedef struct rlb_flat_entry {
    const char *name;  /* parameter name; NULL for a padding entry */
    int32_t ndim;      /* 1 or 2 (ignored for padding) */
    int64_t shape[2];  /* the parameter's shape (ignored for padding) */
    uint64_t numel;    /* elements the entry occupies in the flat parameter */
} rlb_flat_entry;

/* An FSDP1 FlatParameter unit as the trainer describes it. */
typedef struct rlb_flat_unit {
    rlb_dtype dtype;               /* element type of the whole flat parameter */
    int32_t world;                 /* W: ranks the flat parameter is sharded over */
    uint64_t chunk_numel;          /* elements per rank: ceil(sum of numels / W) */
    uint64_t n_entries;            /* entries in entries[] */
    const rlb_flat_entry *entries; /* parameters and padding, in flat order */
    const rlb_src_loc *ranks;      /* [world] where rank f's chunk is */
} rlb_flat_unit;

/* A run of elements [elem0, elem0 + n_elems) of one parameter (row-major index into the
 * global tensor), stored contiguously at `offset` in source buffer `buffer`. */
typedef struct rlb_src_piece {
    int64_t param;    /* index into the parameter list */
    uint64_t elem0;   /* first element */
    uint64_t n_elems; /* number of elements */
    uint32_t buffer;  /* source buffer index (the plan's src_ref) */
    rlb_dtype dtype;  /* element type in the buffer */
    uint64_t offset;  /* byte offset of elem0 in the buffer */
} rlb_src_piece;

typedef struct rlb_source {
    const rlb_param_list *params; /* the model's parameters (borrowed; must outlive this) */
    uint32_t n_buffers;           /* buffers registered */
    uint32_t cap_buffers;         /* allocated entries of buffer_bytes[] */
    uint64_t *buffer_bytes;       /* [n_buffers] length of each registered buffer */
    uint64_t n_pieces;            /* pieces in pieces[] */
    uint64_t cap_pieces;          /* allocated entries of pieces[] */
    rlb_src_piece *pieces;        /* in the order added */
    uint8_t *added;               /* [params->n] 1 once the parameter has a placement */
} rlb_source;

/* Returns 0 or RLB_ENOMEM. */
int rlb__source_init(rlb_source *src, const rlb_param_list *params);
void rlb__source_free(rlb_source *src);
/* Registers a buffer of `bytes` bytes. Returns its index (>= 0), or RLB_ENOMEM /
 * RLB_ETOOBIG (more than INT32_MAX buffers). */
int rlb__source_add_buffer(rlb_source *src, uint64_t bytes);
/* The whole tensor `name` of shape[ndim], row-major at `offset` in `buffer`.
 * Returns 0 or an error listed above; `err` (may be NULL) names the tensor. */
int rlb__source_add_full(rlb_source *src, const char *name, int ndim, const int64_t *shape,
                         rlb_dtype dtype, uint32_t buffer, uint64_t offset, char *err,
                         size_t errlen);
/* Tensor `name` sharded FSDP2-style over `world` ranks; ranks[world] say where each
 * rank's rows are. Returns 0 or an error listed above. */
int rlb__source_add_fsdp2(rlb_source *src, const char *name, int ndim, const int64_t *shape,
                          rlb_dtype dtype, int world, const rlb_src_loc *ranks, char *err,
                          size_t errlen);
/* One FSDP1 FlatParameter unit. Returns 0 or an error listed above. */
int rlb__source_add_fsdp1(rlb_source *src, const rlb_flat_unit *unit, char *err,
                          size_t errlen);
/* Checks that every parameter of the model has a placement. Returns 0 or RLB_ENOTFOUND
 * naming the first missing tensor. */
int rlb__source_check(const rlb_source *src, char *err, size_t errlen);

#endif /* RLB_MODEL_SOURCE_H */
