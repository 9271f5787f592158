/* err.c: names of the RLB_E* codes and of the dtypes, the two tables every process shares. */
#include "rlb/rlb.h"

RLB_API const char *rlb_strerror(int code)
{
    /* Indexed by -code; keep in the order of the enum in rlb.h. */
    static const char *const names[RLB_E_COUNT_] = {
        "success",
        "invalid argument",
        "out of memory",
        "system call failed",
        "timed out",
        "peer died",
        "try again",
        "malformed message",
        "version mismatch",
        "permission denied",
        "not found",
        "already exists",
        "too big",
        "shape mismatch",
        "unsupported dtype",
        "unsupported",
        "weights are stale",
        "aborted",
        "CUDA error",
        "shutting down",
        "corrupted shared memory",
        "non-finite values",
        "no live worker replica",
        "no weights yet",
    };
    _Static_assert(sizeof(names) / sizeof(names[0]) == RLB_E_COUNT_, "one name per code");
    if (code > 0 || code <= -RLB_E_COUNT_)
        return "unknown error";
    return names[-code];
}

RLB_API size_t rlb_dtype_size(rlb_dtype dtype)
{
    switch (dtype) {
    case RLB_DTYPE_F32: return 4;
    case RLB_DTYPE_BF16: return 2;
    case RLB_DTYPE_F16: return 2;
    case RLB_DTYPE_F8E4M3: return 1;
    case RLB_DTYPE_I8: return 1;
    case RLB_DTYPE_I32: return 4;
    case RLB_DTYPE_I64: return 8;
    case RLB_DTYPE_U8: return 1;
    default: return 0;
    }
}

RLB_API const char *rlb_dtype_name(rlb_dtype dtype)
{
    switch (dtype) {
    case RLB_DTYPE_F32: return "F32";
    case RLB_DTYPE_BF16: return "BF16";
    case RLB_DTYPE_F16: return "F16";
    case RLB_DTYPE_F8E4M3: return "F8_E4M3";
    case RLB_DTYPE_I8: return "I8";
    case RLB_DTYPE_I32: return "I32";
    case RLB_DTYPE_I64: return "I64";
    case RLB_DTYPE_U8: return "U8";
    default: return "?";
    }
}
