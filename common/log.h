/* log.h: leveled logging filtered by subsystem, one line per event on stderr.
 *
 * RLB_LOG selects the level and, optionally, subsystems: "info", "debug:ring,conn".
 * Libraries stay quiet until RLB_LOG is set; daemons call rlb__log_init_default(INFO)
 * so they log events at info level without it. Lines read
 *   rlb 12:34:56.789 [pid] LEVEL sub: message
 */
#ifndef RLB_COMMON_LOG_H
#define RLB_COMMON_LOG_H

typedef enum rlb_log_level {
    RLB_LOG_OFF = 0,
    RLB_LOG_LVL_ERROR = 1,
    RLB_LOG_LVL_WARN = 2,
    RLB_LOG_LVL_INFO = 3,
    RLB_LOG_LVL_DEBUG = 4
} rlb_log_level;

/* Subsystems; the names in log.c are what RLB_LOG's list matches. */
typedef enum rlb_log_sub {
    RLB_SUB_CORE = 0, /* errors, knobs, checks */
    RLB_SUB_RING,     /* shared-memory rings */
    RLB_SUB_CONN,     /* sockets, segments, handshake, liveness */
    RLB_SUB_PROTO,    /* message encoding and validation */
    RLB_SUB_MODEL,    /* config, checkpoints, parameter lists */
    RLB_SUB_PLAN,     /* reshard planner and executors */
    RLB_SUB_KERNEL,   /* CPU and CUDA kernels */
    RLB_SUB_ENGINE,   /* generation engine */
    RLB_SUB_BRIDGE,   /* rlb-bridge daemon */
    RLB_SUB_WORKER,   /* rlb-worker daemon */
    RLB_SUB_CLIENT,   /* librlb */
    RLB_SUB_LAUNCH,   /* rlb-launch and rendezvous */
    RLB_SUB_COUNT_
} rlb_log_sub;

/* Level used when RLB_LOG is unset (daemons pass RLB_LOG_LVL_INFO). Call before logging. */
void rlb__log_init_default(rlb_log_level level);
/* True when a message of this level and subsystem would be printed. */
int rlb__log_enabled(rlb_log_level level, rlb_log_sub sub);
void rlb__log_write(rlb_log_level level, rlb_log_sub sub, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define RLB__LOG(level, sub, ...)                                                        \
    do {                                                                                 \
        if (rlb__log_enabled((level), (sub)))                                            \
            rlb__log_write((level), (sub), __VA_ARGS__);                                 \
    } while (0)
#define RLB_LOG_ERROR(sub, ...) RLB__LOG(RLB_LOG_LVL_ERROR, sub, __VA_ARGS__)
#define RLB_LOG_WARN(sub, ...) RLB__LOG(RLB_LOG_LVL_WARN, sub, __VA_ARGS__)
#define RLB_LOG_INFO(sub, ...) RLB__LOG(RLB_LOG_LVL_INFO, sub, __VA_ARGS__)
#define RLB_LOG_DEBUG(sub, ...) RLB__LOG(RLB_LOG_LVL_DEBUG, sub, __VA_ARGS__)

#endif /* RLB_COMMON_LOG_H */
