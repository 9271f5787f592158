/* cuda_check.c: the one formatter of refusals for kernels/cuda (cuda_check.h). */
#include "kernels/cuda/cuda_check.h"

#include <stdarg.h>
#include <stdio.h>

void rlb__cuda_err(char *err, size_t errlen, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    RLB_LOG_ERROR(RLB_SUB_KERNEL, "%s", line);
    if (err && errlen)
        snprintf(err, errlen, "%s", line);
}
