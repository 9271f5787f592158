/* loader.c: checkpoint -> source -> reshard plan -> CPU executor -> one rank's buffer
 * (see loader.h). Check: tests/unit/test_engine_hf.c loads the HF fixtures through it at
 * TP 1, 2 and 4 and compares logits with HF's; test_engine_generate.c covers its errors. */
#include "worker/loader.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/check.h"
#include "common/log.h"
#include "kernels/cpu/plan_exec.h"
#include "model/params.h"
#include "model/plan.h"
#include "model/safetensors.h"
#include "model/source.h"
#include "rlb/rlb.h"

/* Tensors HF checkpoints may carry that are buffers, not weights. */
static int ignorable(const char *name)
{
    const char *suffix = "rotary_emb.inv_freq";
    size_t n = strlen(name), m = strlen(suffix);
    return n >= m && strcmp(name + n - m, suffix) == 0;
}

/* Registers every checkpoint file as a source buffer and every tensor as a full placement. */
static int add_checkpoint(rlb_source *src, const rlb_st_checkpoint *ck, char *err, size_t errlen)
{
    uint32_t files = rlb__st_file_count(ck);
    for (uint32_t f = 0; f < files; f++) {
        uint64_t len;
        rlb__st_file_base(ck, f, &len);
        int rc = rlb__source_add_buffer(src, len);
        if (rc < 0)
            return rlb__model_err(err, errlen, rc, "out of memory");
    }
    size_t n = rlb__st_count(ck);
    for (size_t i = 0; i < n; i++) {
        const rlb_st_tensor *t = rlb__st_at(ck, i);
        if (ignorable(t->name))
            continue;
        int rc = rlb__source_add_full(src, t->name, t->ndim, t->shape, t->dtype, t->file,
                                      t->file_offset, err, errlen);
        if (rc)
            return rc;
    }
    return rlb__source_check(src, err, errlen);
}

/* Runs the ops of plan destination `rank` with that destination rebound to index 0. */
static int exec_rank(const rlb_plan *plan, uint32_t rank, const rlb_st_checkpoint *ck,
                     void *weights, int threads, char *err, size_t errlen)
{
    uint64_t first = plan->dst_first_op[rank], count = plan->dst_first_op[rank + 1] - first;
    uint32_t files = rlb__st_file_count(ck);
    rlb_copy_op *ops = malloc((size_t)(count ? count : 1) * sizeof *ops);
    const void **src = malloc((size_t)files * sizeof *src);
    uint64_t *src_len = malloc((size_t)files * sizeof *src_len);
    int rc = RLB_ENOMEM;
    if (!ops || !src || !src_len) {
        rlb__model_err(err, errlen, rc, "out of memory");
        goto out;
    }
    for (uint64_t i = 0; i < count; i++) {
        ops[i] = plan->ops[first + i];
        ops[i].dst_ref = 0;
    }
    for (uint32_t f = 0; f < files; f++)
        src[f] = rlb__st_file_base(ck, f, &src_len[f]);
    uint64_t dst_first[2] = {0, count};
    uint64_t dst_len = plan->dst_bytes[rank];
    rlb_plan one = {.n_src = plan->n_src, .n_dst = 1, .src_bytes = plan->src_bytes,
                    .dst_bytes = &dst_len, .dst_first_op = dst_first, .n_ops = count,
                    .ops = ops};
    void *dst[1] = {weights};
    rc = rlb__plan_exec_cpu(&one, src, src_len, dst, &dst_len, threads, err, errlen);
out:
    free(ops);
    free(src);
    free(src_len);
    return rc;
}

int rlb__load_weights(const char *dir, const rlb_tp_layout *layout, void *weights, int threads,
                      char *err, size_t errlen)
{
    rlb_st_checkpoint *ck = NULL;
    rlb_param_list params = {0};
    rlb_source src = {0};
    rlb_plan plan = {0};
    int rc = rlb__st_open(dir, &ck, err, errlen);
    if (rc)
        return rc;
    RLB_CHECK_GOTO(rlb__params_init(&params, &layout->cfg, err, errlen), rc, out);
    if ((rc = rlb__source_init(&src, &params))) {
        rlb__model_err(err, errlen, rc, "out of memory");
        goto out;
    }
    RLB_CHECK_GOTO(add_checkpoint(&src, ck, err, errlen), rc, out);
    rlb_target tgt = {.tp_size = layout->tp_size, .replicas = 1, .dtype = layout->dtype};
    RLB_CHECK_GOTO(rlb__plan_build(&src, &tgt, &plan, err, errlen), rc, out);
    if (plan.dst_bytes[layout->tp_rank] != layout->total_bytes) {
        rc = rlb__model_err(err, errlen, RLB_EINVAL, "plan and layout disagree on the buffer size");
        goto out;
    }
    rc = exec_rank(&plan, (uint32_t)layout->tp_rank, ck, weights, threads, err, errlen);
out:
    rlb__plan_free(&plan);
    rlb__source_free(&src);
    rlb__params_free(&params);
    rlb__st_close(ck);
    return rc;
}

int rlb__load_checkpoint(const char *dir, int tp_size, int tp_rank, rlb_loaded *out, char *err,
                         size_t errlen)
{
    return rlb__load_checkpoint_as(dir, tp_size, tp_rank, RLB_DTYPE_F32, out, err, errlen);
}

int rlb__load_checkpoint_as(const char *dir, int tp_size, int tp_rank, rlb_dtype dtype,
                            rlb_loaded *out, char *err, size_t errlen)
{
    rlb_model_config cfg;
    memset(out, 0, sizeof *out);
    int rc = rlb__config_load_dir(dir, &cfg, err, errlen);
    if (rc)
        return rc;
    if ((rc = rlb__tp_check(&cfg, tp_size, err, errlen)))
        return rc;
    if ((rc = rlb__tp_layout_init(&out->layout, &cfg, tp_size, tp_rank, dtype)))
        return rlb__model_err(err, errlen, rc, "TP rank %d of %d: no layout", tp_rank, tp_size);
    if (posix_memalign(&out->weights, 64, out->layout.total_bytes)) {
        out->weights = NULL;
        rlb__loaded_free(out);
        return rlb__model_err(err, errlen, RLB_ENOMEM, "cannot allocate %llu bytes of weights",
                    (unsigned long long)out->layout.total_bytes);
    }
    /* Alignment gaps between tensors are never written by the plan. */
    memset(out->weights, 0, out->layout.total_bytes);
    rc = rlb__load_weights(dir, &out->layout, out->weights, 0, err, errlen);
    if (rc)
        rlb__loaded_free(out);
    return rc;
}

void rlb__loaded_free(rlb_loaded *m)
{
    free(m->weights);
    rlb__tp_layout_free(&m->layout);
    m->weights = NULL;
}
