/* log.c: parses RLB_LOG once and writes single-line, atomic (one write(2)) log records. */
#include "common/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "common/env.h"

static const char *const sub_names[RLB_SUB_COUNT_] = {
    "core", "ring", "conn", "proto", "model", "plan",
    "kernel", "engine", "bridge", "worker", "client", "launch",
};
static const char *const level_names[] = {"OFF", "ERROR", "WARN", "INFO", "DEBUG"};

static struct {
    pthread_once_t once;
    rlb_log_level default_level; /* used when RLB_LOG is empty */
    rlb_log_level level;         /* parsed threshold */
    unsigned sub_mask;           /* bit per rlb_log_sub that may print */
} log_state = {PTHREAD_ONCE_INIT, RLB_LOG_OFF, RLB_LOG_OFF, 0};

static rlb_log_level parse_level(const char *s, size_t n)
{
    for (int l = RLB_LOG_LVL_ERROR; l <= RLB_LOG_LVL_DEBUG; l++)
        if (strlen(level_names[l]) == n && strncasecmp(s, level_names[l], n) == 0)
            return (rlb_log_level)l;
    return RLB_LOG_LVL_INFO;
}

static void parse_env(void)
{
    const char *spec = rlb__env_str(RLB_KNOB_LOG);
    log_state.sub_mask = ~0u;
    if (!*spec) {
        log_state.level = log_state.default_level;
        return;
    }
    const char *colon = strchr(spec, ':');
    log_state.level = parse_level(spec, colon ? (size_t)(colon - spec) : strlen(spec));
    if (!colon)
        return;
    log_state.sub_mask = 0;
    for (const char *p = colon + 1; *p;) {
        size_t n = strcspn(p, ",");
        for (int s = 0; s < RLB_SUB_COUNT_; s++)
            if (strlen(sub_names[s]) == n && strncmp(p, sub_names[s], n) == 0)
                log_state.sub_mask |= 1u << s;
        p += n + (p[n] == ',');
    }
}

void rlb__log_init_default(rlb_log_level level)
{
    log_state.default_level = level;
}

int rlb__log_enabled(rlb_log_level level, rlb_log_sub sub)
{
    pthread_once(&log_state.once, parse_env);
    return level <= log_state.level && (unsigned)sub < RLB_SUB_COUNT_ &&
           (log_state.sub_mask >> sub & 1u);
}

void rlb__log_write(rlb_log_level level, rlb_log_sub sub, const char *fmt, ...)
{
    char line[1024];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "rlb %02d:%02d:%02d.%03ld [%d] %s %s: ", tm.tm_hour,
                     tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000, (int)getpid(),
                     level_names[level], sub_names[sub]);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2)
        len = sizeof line - 2; /* truncated: keep the newline */
    line[len++] = '\n';
    /* One write(2) per line, so lines of concurrent processes do not interleave. */
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}
