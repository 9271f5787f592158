/* cli_args.c: whole option values for the rlb subcommands (cli_args.h). */
#include "common/cli_args.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

int rlb__cli_bad(const char *cmd, const char *opt, const char *val, const char *why)
{
    fprintf(stderr, "rlb %s: bad value '%s' for --%s: %s\n", cmd, val, opt, why);
    return 2;
}

int rlb__cli_long(const char *cmd, const char *opt, const char *s, long lo, long hi,
                  long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || isspace((unsigned char)*s))
        return rlb__cli_bad(cmd, opt, s, "not an integer");
    if (v < lo || v > hi) {
        char why[96];
        snprintf(why, sizeof why, "must be in [%ld, %ld]", lo, hi);
        return rlb__cli_bad(cmd, opt, s, why);
    }
    *out = v;
    return 0;
}

int rlb__cli_u64(const char *cmd, const char *opt, const char *s, uint64_t lo, uint64_t hi,
                 uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    /* strtoull takes a sign and wraps a negative value: refuse anything not a digit first */
    if (!isdigit((unsigned char)*s) || end == s || *end || errno)
        return rlb__cli_bad(cmd, opt, s, "not an unsigned integer");
    if (v < lo || v > hi) {
        char why[96];
        snprintf(why, sizeof why, "must be in [%llu, %llu]", (unsigned long long)lo,
                 (unsigned long long)hi);
        return rlb__cli_bad(cmd, opt, s, why);
    }
    *out = (uint64_t)v;
    return 0;
}

int rlb__cli_float(const char *cmd, const char *opt, const char *s, double lo, double hi,
                   float *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v) || isspace((unsigned char)*s))
        return rlb__cli_bad(cmd, opt, s, "not a finite number");
    if (!(v >= lo && v <= hi)) {
        char why[96];
        snprintf(why, sizeof why, "must be in [%.10g, %.10g]", lo, hi);
        return rlb__cli_bad(cmd, opt, s, why);
    }
    *out = (float)v;
    return 0;
}
