/* check.h: the one family of check macros. Each logs where it failed (at debug level for
 * expected conditions, error level otherwise) and returns or jumps with an RLB_E* code.
 *
 *   RLB_CHECK(expr)             expr is an rlb call returning <0 on error: return that code
 *   RLB_CHECK_GOTO(expr, rc, l) same, but store the code in rc and goto l (unwinding)
 *   RLB_SYSCHECK(call, rc, l)   POSIX call returning -1/errno; retried on EINTR; on failure
 *                               logs strerror(errno), sets rc = RLB_EIO (RLB_ENOMEM for
 *                               ENOMEM/ENOSPC) and goes to l
 *   RLB_PTHREADCHECK(call, rc, l) pthread call returning an error number: logs it, sets
 *                               rc = RLB_EIO and goes to l
 */
#ifndef RLB_COMMON_CHECK_H
#define RLB_COMMON_CHECK_H

#include <errno.h>
#include <string.h>

#include "common/log.h"
#include "rlb/rlb.h"

#define RLB_CHECK(expr)                                                                 \
    do {                                                                                \
        int rlb__c_rc = (expr);                                                         \
        if (rlb__c_rc < 0) {                                                            \
            RLB_LOG_DEBUG(RLB_SUB_CORE, "%s failed: %s", #expr, rlb_strerror(rlb__c_rc)); \
            return rlb__c_rc;                                                           \
        }                                                                               \
    } while (0)

#define RLB_CHECK_GOTO(expr, rc, label)                                                 \
    do {                                                                                \
        (rc) = (expr);                                                                  \
        if ((rc) < 0) {                                                                 \
            RLB_LOG_DEBUG(RLB_SUB_CORE, "%s failed: %s", #expr, rlb_strerror(rc));      \
            goto label;                                                                 \
        }                                                                               \
    } while (0)

#define RLB_SYSCHECK(call, rc, label)                                                   \
    do {                                                                                \
        long rlb__s_rc;                                                                 \
        do {                                                                            \
            rlb__s_rc = (long)(call);                                                   \
        } while (rlb__s_rc == -1 && errno == EINTR);                                    \
        if (rlb__s_rc == -1) {                                                          \
            int rlb__s_errno = errno;                                                   \
            RLB_LOG_ERROR(RLB_SUB_CORE, "%s: %s", #call, strerror(rlb__s_errno));       \
            (rc) = (rlb__s_errno == ENOMEM || rlb__s_errno == ENOSPC) ? RLB_ENOMEM      \
                                                                      : RLB_EIO;        \
            errno = rlb__s_errno;                                                       \
            goto label;                                                                 \
        }                                                                               \
    } while (0)

#define RLB_PTHREADCHECK(call, rc, label)                                               \
    do {                                                                                \
        int rlb__p_rc = (call);                                                         \
        if (rlb__p_rc != 0) {                                                           \
            RLB_LOG_ERROR(RLB_SUB_CORE, "%s: %s", #call, strerror(rlb__p_rc));          \
            (rc) = RLB_EIO;                                                             \
            goto label;                                                                 \
        }                                                                               \
    } while (0)

#endif /* RLB_COMMON_CHECK_H */
