/* clock.h: the monotonic clock, in the units its callers count in: whole nanoseconds and
 * milliseconds for deadlines and timeouts, seconds and milliseconds as doubles for timing.
 * One definition for the tree (the bridge, the client, the executors, the tests, the
 * benchmarks). CLOCK_MONOTONIC: never set back, unaffected by changes of the wall clock.
 */
#ifndef RLB_COMMON_CLOCK_H
#define RLB_COMMON_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline int64_t rlb__clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Whole milliseconds (deadlines, timeouts). */
static inline int64_t rlb__clock_ms(void)
{
    return rlb__clock_ns() / 1000000;
}

/* Seconds and milliseconds with their fractions (timing). */
static inline double rlb__clock_s(void)
{
    return (double)rlb__clock_ns() * 1e-9;
}

static inline double rlb__clock_ms_f(void)
{
    return (double)rlb__clock_ns() * 1e-6;
}

#endif /* RLB_COMMON_CLOCK_H */
