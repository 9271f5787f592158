/* daemon_args.c: what the daemon commands (`rlb worker`, `rlb bridge`) share besides their
 * options: stopping on signals, and strict number parsing for their flags. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "worker/daemon.h"

static volatile sig_atomic_t *stop_flag;

static void on_signal(int sig)
{
    (void)sig;
    *stop_flag = 1;
}

void rlb__daemon_stop_on_signals(volatile sig_atomic_t *flag)
{
    stop_flag = flag;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

int rlb__daemon_parse_u64(const char *cmd, const char *opt, const char *text, uint64_t lo,
                          uint64_t hi, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = text[0] >= '0' && text[0] <= '9' ? strtoull(text, &end, 10) : 0;
    if (text[0] < '0' || text[0] > '9' || *end || errno || v < lo || v > hi) {
        fprintf(stderr, "rlb %s: bad value '%s' for --%s: expected a whole number in "
                "[%llu, %llu]\n", cmd, text, opt, (unsigned long long)lo,
                (unsigned long long)hi);
        return 2;
    }
    *out = v;
    return 0;
}
