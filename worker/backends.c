/* backends.c: backend choice and opening (backends.h). The CUDA half compiles only where
 * the build has CUDA (RLB_HAVE_CUDA, set by rlb_engine_cuda). */
#include "worker/backends.h"

#include <stdio.h>
#include <string.h>

#include "common/env.h"
#include "common/log.h"
#include "rlb/rlb.h"
#include "worker/backend_cpu.h"

#ifdef RLB_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "worker/backend_cuda.h"
#endif

rlb_device rlb__backend_device_env(void)
{
    rlb_device d = RLB_DEVICE_AUTO;
    const char *v = rlb__env_str(RLB_KNOB_DEVICE);
    if (rlb__device_parse(v, &d) < 0)
        RLB_LOG_WARN(RLB_SUB_ENGINE, "RLB_DEVICE=%s: auto, cpu or cuda expected; using auto", v);
    return d;
}

rlb_device rlb__backend_resolve(rlb_device d)
{
    if (d != RLB_DEVICE_AUTO)
        return d;
#ifdef RLB_HAVE_CUDA
    int n = 0;
    if (cudaGetDeviceCount(&n) == cudaSuccess && n > 0)
        return RLB_DEVICE_CUDA;
    cudaGetLastError();
#endif
    return RLB_DEVICE_CPU;
}

rlb_dtype rlb__backend_weight_dtype(const rlb_backend_choice *c)
{
    return rlb__backend_resolve(c->device) == RLB_DEVICE_CUDA ? c->dtype : RLB_DTYPE_F32;
}

int rlb__backend_open(const rlb_tp_layout *layout, const void *weights, rlb_tp_comm *comm,
                      const rlb_backend_choice *c, rlb_ebackend **out, uint64_t *kv_budget,
                      char *err, size_t errlen)
{
    if (kv_budget)
        *kv_budget = 0;
    if (!c || c->struct_size < sizeof(*c))
        return RLB_EINVAL;
    rlb_device d = rlb__backend_resolve(c->device);
    int rc;
    if (d == RLB_DEVICE_CPU) {
        rc = rlb__ebackend_cpu_create(layout, weights, comm, c->quant, out);
        if (rc < 0)
            snprintf(err, errlen, "CPU backend: %s%s", rlb_strerror(rc),
                     c->quant > RLB_QUANT_INT8 ? " (fp8 needs the CUDA backend)" : "");
        return rc;
    }
#ifdef RLB_HAVE_CUDA
    rlb_cuda_backend_opts o = RLB_CUDA_BACKEND_OPTS_INIT;
    o.device = c->cuda_device;
    o.quant = c->quant;
    o.graphs = c->graphs;
    o.batch_invariant = c->batch_invariant;
    o.max_batch_tokens = c->max_batch_tokens;
    o.max_seqs = c->max_seqs;
    o.weight_buffers = c->weight_buffers;
    /* Created without a host copy bound (the backend would upload it again at every
     * post-load processing, long after the caller freed it): uploaded once here. */
    if ((rc = rlb__ebackend_cuda_create(layout, NULL, &o, out)) < 0 ||
        (weights && (rc = rlb__cuda_backend_upload(*out, weights)) < 0)) {
        snprintf(err, errlen, "CUDA backend on GPU %d: %s (the log says more)", c->cuda_device,
                 rlb_strerror(rc));
        if (*out)
            (*out)->iface->destroy(*out);
        *out = NULL;
        return rc;
    }
    if (comm && (rc = rlb__backend_join_tp(*out, comm, err, errlen)) < 0) {
        (*out)->iface->destroy(*out);
        *out = NULL;
        return rc;
    }
    if (kv_budget)
        *kv_budget = rlb__cuda_backend_kv_budget(*out, c->gpu_memory_utilization);
    return 0;
#else
    snprintf(err, errlen, "this build has no CUDA backend (rebuild where nvcc is found)");
    return RLB_EUNSUPPORTED;
#endif
}

int rlb__backend_join_tp(rlb_ebackend *b, rlb_tp_comm *comm, char *err, size_t errlen)
{
#ifdef RLB_HAVE_CUDA
    if (strcmp(b->iface->name, "cuda") != 0 || comm->size == 1)
        return 0;
    int rc = rlb__cuda_backend_join_tp(b, comm);
    if (rc < 0)
        snprintf(err, errlen, "TP rank %d of %d cannot join its group's NCCL communicator: %s "
                 "(NCCL takes one GPU per rank; the log says more)", comm->rank, comm->size,
                 rlb_strerror(rc));
    return rc;
#else
    (void)b, (void)comm, (void)err, (void)errlen;
    return 0;
#endif
}

int rlb__backend_export_weights(rlb_ebackend *b, const rlb_backend_choice *c, int buffer,
                                int *fd, uint64_t *bytes, uint8_t uuid[16])
{
#ifdef RLB_HAVE_CUDA
    if (strcmp(b->iface->name, "cuda") != 0)
        return RLB_EUNSUPPORTED;
    struct cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, c->cuda_device) != cudaSuccess)
        return RLB_ECUDA;
    memcpy(uuid, &prop.uuid, 16);
    return rlb__cuda_backend_export_fd(b, buffer, fd, bytes);
#else
    (void)b, (void)c, (void)buffer, (void)fd, (void)bytes, (void)uuid;
    return RLB_EUNSUPPORTED;
#endif
}

const void *rlb__backend_weight_buffer(rlb_ebackend *b, int buffer)
{
#ifdef RLB_HAVE_CUDA
    if (strcmp(b->iface->name, "cuda") == 0)
        return rlb__cuda_backend_weights(b, buffer);
#endif
    (void)b, (void)buffer;
    return NULL;
}
