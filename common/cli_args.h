/* cli_args.h: option values of the rlb subcommands (the daemons' too), taken only whole:
 * all of the text a number, and in its range. Anything else prints one line,
 *     rlb CMD: bad value 'VALUE' for --OPT: WHY
 * on stderr and returns 2 (the usage-error exit status), leaving *out as it was.
 * Check: tests/unit/test_cli_args.c.
 */
#ifndef RLB_COMMON_CLI_ARGS_H
#define RLB_COMMON_CLI_ARGS_H

#include <stdint.h>

/* Prints the line above; returns 2. */
int rlb__cli_bad(const char *cmd, const char *opt, const char *val, const char *why);
/* A decimal integer in [lo, hi]. Returns 0 or 2. */
int rlb__cli_long(const char *cmd, const char *opt, const char *s, long lo, long hi,
                  long *out);
/* A decimal or 0x-hexadecimal unsigned integer (no sign) in [lo, hi]. Returns 0 or 2. */
int rlb__cli_u64(const char *cmd, const char *opt, const char *s, uint64_t lo, uint64_t hi,
                 uint64_t *out);
/* A finite number in [lo, hi]. Returns 0 or 2. */
int rlb__cli_float(const char *cmd, const char *opt, const char *s, double lo, double hi,
                   float *out);

#endif /* RLB_COMMON_CLI_ARGS_H */
