/* source.c: the trainer-side placement of every parameter (full, FSDP2 Shard(0), FSDP1
 * FlatParameter units), checked against the model's parameter list and reduced to pieces,
 * runs of consecutive elements of one parameter stored contiguously in one buffer.
 *
 * Every add call validates all of its input first and only then appends, so a refused
 * call leaves the source as it was and the caller may fix the input and retry.
 */
#include "model/source.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

/* resolve()'s answer for a tensor the model does not use (tied lm_head, a factor of an
 * adapter not declared): skip it. */
#define DROPPED 1

int rlb__source_init(rlb_source *src, const rlb_param_list *params)
{
    *src = (rlb_source){.params = params};
    src->added = calloc((size_t)params->n + 1, 1);
    return src->added ? 0 : RLB_ENOMEM;
}

void rlb__source_free(rlb_source *src)
{
    free(src->buffer_bytes);
    free(src->pieces);
    free(src->added);
    *src = (rlb_source){0};
}

int rlb__source_add_buffer(rlb_source *src, uint64_t bytes)
{
    if (src->n_buffers >= INT32_MAX)
        return RLB_ETOOBIG;
    if (src->n_buffers == src->cap_buffers) {
        uint32_t cap = src->cap_buffers ? src->cap_buffers * 2 : 16;
        uint64_t *b = realloc(src->buffer_bytes, (size_t)cap * sizeof *b);
        if (!b)
            return RLB_ENOMEM;
        src->buffer_bytes = b;
        src->cap_buffers = cap;
    }
    src->buffer_bytes[src->n_buffers] = bytes;
    return (int)src->n_buffers++;
}

/* Makes room for `more` pieces so the appends that follow a validation cannot fail. */
static int reserve_pieces(rlb_source *src, uint64_t more)
{
    if (src->n_pieces + more <= src->cap_pieces)
        return 0;
    uint64_t cap = src->cap_pieces ? src->cap_pieces : 64;
    while (cap < src->n_pieces + more)
        cap *= 2;
    rlb_src_piece *p = realloc(src->pieces, (size_t)cap * sizeof *p);
    if (!p)
        return RLB_ENOMEM;
    src->pieces = p;
    src->cap_pieces = cap;
    return 0;
}

static void append_piece(rlb_source *src, int64_t param, uint64_t elem0, uint64_t n_elems,
                         rlb_dtype dtype, rlb_src_loc loc)
{
    src->pieces[src->n_pieces++] = (rlb_src_piece){
        .param = param,
        .elem0 = elem0,
        .n_elems = n_elems,
        .buffer = loc.buffer,
        .dtype = dtype,
        .offset = loc.offset,
    };
}

static int is_float_dtype(rlb_dtype dtype)
{
    return dtype == RLB_DTYPE_F32 || dtype == RLB_DTYPE_BF16 || dtype == RLB_DTYPE_F16;
}

static void format_shape(char *buf, size_t len, int ndim, const int64_t *shape)
{
    if (ndim == 1)
        snprintf(buf, len, "[%lld]", (long long)shape[0]);
    else if (ndim == 2)
        snprintf(buf, len, "[%lld, %lld]", (long long)shape[0], (long long)shape[1]);
    else
        snprintf(buf, len, "(%d dimensions)", ndim);
}

static void log_dropped(const char *name)
{
    if (strstr(name, ".lora_"))
        RLB_LOG_INFO(RLB_SUB_MODEL, "%s ignored: its weight has no LoRA adapter declared",
                     name);
    else
        RLB_LOG_INFO(RLB_SUB_MODEL,
                     "%s ignored: the model ties its embeddings, the LM head reads "
                     "model.embed_tokens.weight",
                     name);
}

/* Looks `name` up and checks it against the model: known, not placed yet, shape as the
 * config says. Returns 0 with *param set, DROPPED for a tied model's lm_head.weight (logged
 * here when `log_drop`; an FSDP1 unit logs once for all its entries), or a negative RLB_E*
 * code with `err` naming the tensor. */
static int resolve(const rlb_source *src, const char *name, int ndim, const int64_t *shape,
                   int log_drop, int64_t *param, char *err, size_t errlen)
{
    const rlb_param_list *list = src->params;
    if (!name)
        return rlb__model_err(err, errlen, RLB_EINVAL, "source: tensor without a name");
    if (rlb__params_is_dropped(list, name)) {
        if (log_drop)
            log_dropped(name);
        return DROPPED;
    }
    int64_t i = rlb__params_find(list, name);
    if (i < 0)
        return rlb__model_err(err, errlen, RLB_ENOTFOUND,
                              "source: unknown tensor '%s' (not a parameter of this %s model)",
                              name, rlb__config_arch_name(list->cfg.arch));
    if (src->added[i])
        return rlb__model_err(err, errlen, RLB_EEXIST, "source: tensor '%s' is placed twice",
                              name);
    const rlb_param *p = &list->params[i];
    int64_t want[2] = {p->rows, p->cols};
    if (!shape || ndim != p->ndim || shape[0] != want[0] || (ndim == 2 && shape[1] != want[1])) {
        char got[64], exp[64];
        format_shape(got, sizeof got, shape ? ndim : 0, shape);
        format_shape(exp, sizeof exp, p->ndim, want);
        return rlb__model_err(err, errlen, RLB_ESHAPE,
                              "source: tensor '%s' has shape %s, the config says %s", name, got,
                              exp);
    }
    *param = i;
    return 0;
}

/* Checks that `n_elems` elements of `dtype` at `loc` lie inside a registered buffer. */
static int check_extent(const rlb_source *src, const char *what, rlb_src_loc loc,
                        uint64_t n_elems, rlb_dtype dtype, char *err, size_t errlen)
{
    if (loc.buffer >= src->n_buffers)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "source: %s names buffer %u, but %u buffers are registered", what,
                              loc.buffer, src->n_buffers);
    uint64_t bytes, end;
    if (__builtin_mul_overflow(n_elems, (uint64_t)rlb_dtype_size(dtype), &bytes) ||
        __builtin_add_overflow(loc.offset, bytes, &end) || end > src->buffer_bytes[loc.buffer])
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "source: %s needs bytes [%llu, +%llu) of buffer %u, which has %llu",
                              what, (unsigned long long)loc.offset, (unsigned long long)bytes,
                              loc.buffer, (unsigned long long)src->buffer_bytes[loc.buffer]);
    return 0;
}

static int check_dtype(const char *what, rlb_dtype dtype, char *err, size_t errlen)
{
    if (is_float_dtype(dtype))
        return 0;
    return rlb__model_err(err, errlen, RLB_EDTYPE,
                          "source: %s has dtype %d; F32, BF16 or F16 expected", what,
                          (int)dtype);
}

int rlb__source_add_full(rlb_source *src, const char *name, int ndim, const int64_t *shape,
                         rlb_dtype dtype, uint32_t buffer, uint64_t offset, char *err,
                         size_t errlen)
{
    int64_t i = -1;
    int rc = resolve(src, name, ndim, shape, 1, &i, err, errlen);
    if (rc)
        return rc == DROPPED ? 0 : rc;
    rlb_src_loc loc = {buffer, offset};
    uint64_t numel = rlb__param_numel(&src->params->params[i]);
    char what[RLB_PARAM_NAME_MAX + 16];
    snprintf(what, sizeof what, "tensor '%s'", name);
    if ((rc = check_dtype(what, dtype, err, errlen)) ||
        (rc = check_extent(src, what, loc, numel, dtype, err, errlen)) ||
        (rc = reserve_pieces(src, 1)))
        return rc;
    append_piece(src, i, 0, numel, dtype, loc);
    src->added[i] = 1;
    return 0;
}

int rlb__source_add_fsdp2(rlb_source *src, const char *name, int ndim, const int64_t *shape,
                          rlb_dtype dtype, int world, const rlb_src_loc *ranks, char *err,
                          size_t errlen)
{
    int64_t i = -1;
    int rc = resolve(src, name, ndim, shape, 1, &i, err, errlen);
    if (rc)
        return rc == DROPPED ? 0 : rc;
    if (world < 1 || !ranks)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "source: tensor '%s': FSDP2 world %d without %s", name, world,
                              ranks ? "ranks (must be >= 1)" : "a rank table");
    char what[RLB_PARAM_NAME_MAX + 48];
    snprintf(what, sizeof what, "tensor '%s'", name);
    if ((rc = check_dtype(what, dtype, err, errlen)))
        return rc;
    const rlb_param *p = &src->params->params[i];
    uint64_t d0 = (uint64_t)p->rows, d1 = (uint64_t)p->cols, W = (uint64_t)world;
    uint64_t c = (d0 + W - 1) / W;
    uint64_t n_pieces = 0;
    for (uint64_t f = 0; f < W; f++) {
        uint64_t n_f = f * c >= d0 ? 0 : (d0 - f * c < c ? d0 - f * c : c);
        if (!n_f)
            continue;
        snprintf(what, sizeof what, "tensor '%s' FSDP2 rank %llu of %d", name,
                 (unsigned long long)f, world);
        if (ranks[f].buffer == RLB_SRC_NO_BUFFER)
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "source: %s is missing: it holds rows [%llu, %llu)", what,
                                  (unsigned long long)(f * c), (unsigned long long)(f * c + n_f));
        if ((rc = check_extent(src, what, ranks[f], n_f * d1, dtype, err, errlen)))
            return rc;
        n_pieces++;
    }
    if ((rc = reserve_pieces(src, n_pieces)))
        return rc;
    for (uint64_t f = 0; f < W && f * c < d0; f++) {
        uint64_t n_f = d0 - f * c < c ? d0 - f * c : c;
        append_piece(src, i, f * c * d1, n_f * d1, dtype, ranks[f]);
    }
    src->added[i] = 1;
    return 0;
}

/* Checks one FSDP1 unit's header and rank table; sets *total to the sum of its numels. */
static int check_flat_unit(const rlb_source *src, const rlb_flat_unit *u, uint64_t *total,
                           char *err, size_t errlen)
{
    if (!u || u->world < 1 || !u->ranks || !u->n_entries || !u->entries)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "source: FSDP1 unit needs world >= 1, a rank table and entries");
    int rc = check_dtype("FSDP1 unit", u->dtype, err, errlen);
    if (rc)
        return rc;
    uint64_t sum = 0;
    for (uint64_t e = 0; e < u->n_entries; e++)
        if (__builtin_add_overflow(sum, u->entries[e].numel, &sum))
            return rlb__model_err(err, errlen, RLB_EINVAL,
                                  "source: FSDP1 unit: numels overflow at entry %llu",
                                  (unsigned long long)e);
    uint64_t W = (uint64_t)u->world;
    uint64_t chunk = sum / W + (sum % W != 0);
    if (!sum || u->chunk_numel != chunk)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "source: FSDP1 unit: chunk_numel %llu, but %llu elements over %d "
                              "ranks make chunks of %llu",
                              (unsigned long long)u->chunk_numel, (unsigned long long)sum,
                              u->world, (unsigned long long)chunk);
    for (uint64_t f = 0; f < W; f++) {
        char what[64];
        snprintf(what, sizeof what, "FSDP1 unit rank %llu of %d", (unsigned long long)f,
                 u->world);
        if (u->ranks[f].buffer == RLB_SRC_NO_BUFFER)
            return rlb__model_err(err, errlen, RLB_EINVAL, "source: %s is missing", what);
        if ((rc = check_extent(src, what, u->ranks[f], chunk, u->dtype, err, errlen)))
            return rc;
    }
    *total = sum;
    return 0;
}

/* Checks one named FSDP1 entry: its numel against its own shape, then the tensor against
 * the model. Returns 0 with *param set, DROPPED, or an RLB_E* code. */
static int check_flat_entry(const rlb_source *src, const rlb_flat_entry *e, int64_t *param,
                            char *err, size_t errlen)
{
    uint64_t numel = 1;
    for (int d = 0; d < e->ndim && d < 2; d++)
        if (e->shape[d] < 1 || __builtin_mul_overflow(numel, (uint64_t)e->shape[d], &numel))
            numel = 0; /* no valid entry has an empty or overflowing shape */
    if (e->ndim < 1 || e->ndim > 2 || numel != e->numel)
        return rlb__model_err(err, errlen, RLB_EINVAL,
                              "source: FSDP1 entry '%s' has numel %llu, its %d-d shape holds %llu",
                              e->name, (unsigned long long)e->numel, e->ndim,
                              (unsigned long long)numel);
    return resolve(src, e->name, e->ndim, e->shape, 0, param, err, errlen);
}

int rlb__source_add_fsdp1(rlb_source *src, const rlb_flat_unit *u, char *err, size_t errlen)
{
    uint64_t total;
    int rc = check_flat_unit(src, u, &total, err, errlen);
    if (rc)
        return rc;
    /* Entries are marked added as they pass, so a name twice in the unit is caught; a
     * failure clears the marks this call set. */
    uint64_t chunk = u->chunk_numel, start = 0, n_pieces = 0, e;
    const char *dropped = NULL; /* the first entry the model does not use */
    for (e = 0; e < u->n_entries; start += u->entries[e].numel, e++) {
        const rlb_flat_entry *ent = &u->entries[e];
        if (!ent->name)
            continue;
        int64_t i = -1;
        rc = check_flat_entry(src, ent, &i, err, errlen);
        if (rc == DROPPED) {
            dropped = dropped ? dropped : ent->name;
            continue;
        }
        if (rc)
            goto err;
        src->added[i] = 1;
        n_pieces += (start + ent->numel - 1) / chunk - start / chunk + 1;
    }
    if ((rc = reserve_pieces(src, n_pieces)))
        goto err;
    start = 0;
    for (e = 0; e < u->n_entries; start += u->entries[e].numel, e++) {
        const rlb_flat_entry *ent = &u->entries[e];
        int64_t i = ent->name ? rlb__params_find(src->params, ent->name) : -1;
        if (i < 0)
            continue; /* padding, or a dropped entry */
        /* Cut the entry's flat range [start, end) at chunk (= rank) boundaries. */
        for (uint64_t pos = start, end = start + ent->numel; pos < end;) {
            uint64_t f = pos / chunk, stop = (f + 1) * chunk < end ? (f + 1) * chunk : end;
            rlb_src_loc loc = u->ranks[f];
            loc.offset += (pos - f * chunk) * rlb_dtype_size(u->dtype);
            append_piece(src, i, pos - start, stop - pos, u->dtype, loc);
            pos = stop;
        }
    }
    if (dropped)
        log_dropped(dropped);
    return 0;
err:
    for (uint64_t k = 0; k < e; k++) {
        int64_t i = u->entries[k].name ? rlb__params_find(src->params, u->entries[k].name) : -1;
        if (i >= 0)
            src->added[i] = 0;
    }
    return rc;
}

int rlb__source_check(const rlb_source *src, char *err, size_t errlen)
{
    for (int64_t i = 0; i < src->params->n; i++)
        if (!src->added[i])
            return rlb__model_err(err, errlen, RLB_ENOTFOUND,
                                  "source: tensor '%s' is missing (no rank registered it)",
                                  src->params->params[i].name);
    return 0;
}
