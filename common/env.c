/* env.c: lookup of the knobs declared in env.h. */
#include "common/env.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>

#include "common/log.h"

static const rlb_env_entry rlb__env_entries[RLB_KNOB_COUNT_] = {
#define RLB__ENV_ROW(id, name, def, help) {name, def, help},
    RLB_ENV_KNOBS(RLB__ENV_ROW)
#undef RLB__ENV_ROW
};

const rlb_env_entry *rlb__env_table(void)
{
    return rlb__env_entries;
}

const char *rlb__env_str(rlb_env_knob knob)
{
    if ((unsigned)knob >= RLB_KNOB_COUNT_)
        return "";
    const char *v = getenv(rlb__env_entries[knob].name);
    return (v && *v) ? v : rlb__env_entries[knob].def;
}

static int parse_ll(const char *s, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

long long rlb__env_int(rlb_env_knob knob)
{
    long long v = 0;
    if ((unsigned)knob >= RLB_KNOB_COUNT_)
        return 0;
    if (parse_ll(rlb__env_str(knob), &v) == 0)
        return v;
    RLB_LOG_WARN(RLB_SUB_CORE, "%s=%s is not an integer; using the default %s",
                 rlb__env_entries[knob].name, rlb__env_str(knob), rlb__env_entries[knob].def);
    parse_ll(rlb__env_entries[knob].def, &v);
    return v;
}

int rlb__env_positive(rlb_env_knob knob)
{
    long long v = rlb__env_int(knob);
    if (v > 0 && v <= INT_MAX)
        return (int)v;
    if ((unsigned)knob >= RLB_KNOB_COUNT_)
        return 0;
    RLB_LOG_WARN(RLB_SUB_CORE, "%s=%lld is not in 1..%d; using the default %s",
                 rlb__env_entries[knob].name, v, INT_MAX, rlb__env_entries[knob].def);
    parse_ll(rlb__env_entries[knob].def, &v);
    return (int)v;
}
