/* stress_sched.c: the fault schedule of `rlb stress` and the random streams its roles draw
 * from. The schedule depends on (seed, duration, kinds) only, never on the clock or on what
 * the processes did, so `--seed N` replays the same faults at the same moments; the unit
 * test tests/unit/test_stress_sched.c holds it to that.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "launch/stress.h"
#include "rlb/rlb.h"

static const struct {
    const char *name;
    double per_minute; /* mean events per minute */
} faults[RLB_FAULT_COUNT_] = {
    [RLB_FAULT_KILL_BRIDGE] = {"kill_bridge", 3},
    [RLB_FAULT_KILL_WORKER] = {"kill_worker", 8},
    [RLB_FAULT_KILL_TRAINER] = {"kill_trainer", 8},
    [RLB_FAULT_KILL_CLIENT] = {"kill_client", 8},
    [RLB_FAULT_STOP_WORKER] = {"stop_worker", 4},
    [RLB_FAULT_POISON] = {"poison", 10},
    [RLB_FAULT_GARBAGE] = {"garbage", 12},
    [RLB_FAULT_TRUNCATED] = {"truncated", 12},
    [RLB_FAULT_DISCONNECT] = {"disconnect", 12},
    [RLB_FAULT_TRUNCATE_SEG] = {"truncate_seg", 6},
};

const char *rlb__stress_fault_name(uint32_t kind)
{
    return kind < RLB_FAULT_COUNT_ ? faults[kind].name : "?";
}

double rlb__stress_fault_rate(uint32_t kind)
{
    return kind < RLB_FAULT_COUNT_ ? faults[kind].per_minute : 0;
}

int rlb__stress_parse_faults(const char *list, uint32_t *mask, char *err, size_t errlen)
{
    *mask = 0;
    if (!strcmp(list, "all")) {
        *mask = RLB_FAULTS_ALL;
        return 0;
    }
    if (!strcmp(list, "none") || !*list)
        return 0;
    const char *p = list;
    while (*p) {
        size_t n = strcspn(p, ",");
        uint32_t k = 0;
        while (k < RLB_FAULT_COUNT_ &&
               (strlen(faults[k].name) != n || strncmp(faults[k].name, p, n)))
            k++;
        if (k == RLB_FAULT_COUNT_) {
            if (err && errlen)
                snprintf(err, errlen, "unknown fault '%.*s'", (int)n, p);
            return RLB_EINVAL;
        }
        *mask |= 1u << k;
        p += n + (p[n] == ',');
    }
    return 0;
}

uint64_t rlb__stress_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint32_t rlb__stress_below(uint64_t *s, uint32_t n)
{
    return (uint32_t)((rlb__stress_rand(s) >> 32) * n >> 32);
}

uint64_t rlb__stress_key(uint64_t seed, uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t s = seed ^ 0x5354524553535f31ull; /* "STRESS_1" */
    s = rlb__stress_rand(&s) ^ a;
    s = rlb__stress_rand(&s) ^ b;
    s = rlb__stress_rand(&s) ^ c;
    return rlb__stress_rand(&s);
}

static int by_time(const void *a, const void *b)
{
    const rlb_stress_event *x = a, *y = b;
    if (x->at_ms != y->at_ms)
        return x->at_ms < y->at_ms ? -1 : 1;
    return x->kind < y->kind ? -1 : x->kind > y->kind;
}

int rlb__stress_schedule(uint64_t seed, int64_t duration_ms, uint32_t mask,
                         rlb_stress_event **out)
{
    *out = NULL;
    if (duration_ms < 0 || mask & ~RLB_FAULTS_ALL)
        return RLB_EINVAL;
    size_t n = 0, cap = 64;
    rlb_stress_event *ev = malloc(cap * sizeof(*ev));
    if (!ev)
        return RLB_ENOMEM;
    for (uint32_t k = 0; k < RLB_FAULT_COUNT_; k++) {
        if (!(mask >> k & 1))
            continue;
        /* One stream per kind: adding or removing a kind leaves the others' times alone. */
        uint64_t s = rlb__stress_key(seed, 0x7363686564ull /* "sched" */, k, 0);
        double mean_ms = 60000.0 / faults[k].per_minute;
        for (double t = 0;;) {
            double u = ((rlb__stress_rand(&s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
            t += -log(u) * mean_ms;
            if (t >= (double)duration_ms)
                break;
            if (n == cap) {
                rlb_stress_event *grown = realloc(ev, 2 * cap * sizeof(*ev));
                if (!grown) {
                    free(ev);
                    return RLB_ENOMEM;
                }
                ev = grown;
                cap *= 2;
            }
            ev[n++] = (rlb_stress_event){.at_ms = (int64_t)t, .kind = k,
                                         .target = (uint32_t)rlb__stress_rand(&s),
                                         .arg = (uint32_t)rlb__stress_rand(&s)};
        }
    }
    qsort(ev, n, sizeof(*ev), by_time);
    *out = ev;
    return (int)n;
}
