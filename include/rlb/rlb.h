/* rlb.h: the public C API of rlbridge, the only installed header.
 *
 * Every function returns 0 (or a non-negative count where its comment says so) on success
 * and a negative RLB_E* code on failure; rlb_strerror() names the code. Nothing here exits
 * or prints unless logging is switched on with RLB_LOG.
 */
#ifndef RLB_RLB_H
#define RLB_RLB_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define RLB_API __attribute__((visibility("default")))
#else
#define RLB_API
#endif

#define RLB_ABI_VERSION 1u

/* Error codes: negative values, errno-style. Keep rlb_strerror() in step. */
enum {
    RLB_OK = 0,
    RLB_EINVAL = -1,     /* invalid argument or malformed input */
    RLB_ENOMEM = -2,     /* out of memory (heap, shared memory or device memory) */
    RLB_EIO = -3,        /* system call failed; the log says which */
    RLB_ETIMEDOUT = -4,  /* a bounded wait ran out */
    RLB_EPEERDEAD = -5,  /* the peer process died or closed its side */
    RLB_EAGAIN = -6,     /* nothing to do now; try again (ring empty or full) */
    RLB_EPROTO = -7,     /* a message failed validation */
    RLB_EVERSION = -8,   /* ABI or format version mismatch */
    RLB_EPERM = -9,      /* peer refused (other uid, bad permissions) */
    RLB_ENOTFOUND = -10, /* a named thing (tensor, file, field) is missing */
    RLB_EEXIST = -11,    /* a thing that must be unique is already there */
    RLB_ETOOBIG = -12,   /* larger than a limit allows */
    RLB_ESHAPE = -13,    /* tensor shape or layout does not match the model */
    RLB_EDTYPE = -14,    /* unknown or unsupported dtype */
    RLB_EUNSUPPORTED = -15, /* valid but not supported (architecture, TP size, backend) */
    RLB_ESTALE = -16,    /* weights are stale after an aborted sync; generation refused */
    RLB_EABORTED = -17,  /* the operation (a sync) was aborted */
    RLB_ECUDA = -18,     /* a CUDA, cuBLAS or NCCL call failed; the log says which */
    RLB_ESHUTDOWN = -19, /* the bridge is shutting down */
    RLB_ECORRUPT = -20,  /* shared memory holds values no honest peer writes */
    RLB_E_COUNT_ = 21
};

/* Returns a static, human-readable name for an RLB_E* code (any int is accepted). */
RLB_API const char *rlb_strerror(int code);

/* Element types of tensors. The numbering is part of the wire protocol: append only. */
typedef enum rlb_dtype {
    RLB_DTYPE_F32 = 0,
    RLB_DTYPE_BF16 = 1,
    RLB_DTYPE_F16 = 2,
    RLB_DTYPE_F8E4M3 = 3,
    RLB_DTYPE_I8 = 4,
    RLB_DTYPE_I32 = 5,
    RLB_DTYPE_I64 = 6,
    RLB_DTYPE_U8 = 7,
    RLB_DTYPE_COUNT_
} rlb_dtype;

/* Size in bytes of one element, or 0 for a value outside the enum. */
RLB_API size_t rlb_dtype_size(rlb_dtype dtype);
/* Name as safetensors spells it ("F32", "BF16", "F8_E4M3", ...), or "?" outside the enum. */
RLB_API const char *rlb_dtype_name(rlb_dtype dtype);

/* Compute backend of a run. AUTO picks CUDA when a GPU is visible. */
typedef enum rlb_device {
    RLB_DEVICE_AUTO = 0,
    RLB_DEVICE_CPU = 1,
    RLB_DEVICE_CUDA = 2
} rlb_device;

#ifdef __cplusplus
}
#endif
#endif /* RLB_RLB_H */
