/* stress_role.c: what the roles of `rlb stress` (trainer, client, checker) share: their
 * command line, their clock, SIGTERM as "finish what you are doing and stop", and the
 * records they send to the supervisor.
 */
#include <getopt.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "launch/stress.h"

static volatile sig_atomic_t stopping;

static void on_term(int sig)
{
    (void)sig;
    stopping = 1;
}

const char *rlb__stress_truncate_name(uint32_t truncate)
{
    static const char *const names[] = {[RLB_TRUNCATE_NONE] = "none",
                                         [RLB_TRUNCATE_UNSEALED] = "unsealed",
                                         [RLB_TRUNCATE_SEALED] = "sealed"};
    return truncate <= RLB_TRUNCATE_SEALED ? names[truncate] : "?";
}

int rlb__stress_role_parse(int argc, char **argv, rlb_stress_role_opts *o)
{
    static const struct option longopts[] = {
        {"socket", required_argument, NULL, 's'}, {"seed", required_argument, NULL, 'S'},
        {"rank", required_argument, NULL, 'r'},   {"world", required_argument, NULL, 'w'},
        {"units", required_argument, NULL, 'u'},  {"id", required_argument, NULL, 'i'},
        {"replicas", required_argument, NULL, 'p'}, {"role", required_argument, NULL, 'R'},
        {"truncate", required_argument, NULL, 'T'}, {NULL, 0, NULL, 0}};
    *o = (rlb_stress_role_opts){.seed = 1, .world = 1, .replicas = 1};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 's': o->socket = optarg; break;
        case 'S': o->seed = strtoull(optarg, NULL, 0); break;
        case 'r': o->rank = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'w': o->world = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'u': o->units = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'i': o->id = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'p': o->replicas = (uint32_t)strtoul(optarg, NULL, 0); break;
        case 'R': break;
        case 'T':
            o->truncate = RLB_TRUNCATE_UNSEALED;
            while (o->truncate <= RLB_TRUNCATE_SEALED &&
                   strcmp(optarg, rlb__stress_truncate_name(o->truncate)))
                o->truncate++;
            if (o->truncate > RLB_TRUNCATE_SEALED)
                return 2;
            break;
        default: return 2;
        }
    }
    struct sigaction sa = {.sa_handler = on_term};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigset_t term; /* blocked by the supervisor until now (cmd_stress.c spawn) */
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigprocmask(SIG_UNBLOCK, &term, NULL);
    return 0;
}

void rlb__stress_tool_options(rlb_client_options *o, const char *socket)
{
    rlb_client_options_init(o);
    o->socket = socket;
    o->observer = 1;
    o->connect_timeout_ms = 2000;
    o->request_timeout_ms = 10000;
}

int rlb__stress_stopping(void)
{
    return stopping;
}

void rlb__stress_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int rlb__stress_send(const rlb_stress_rec *r)
{
    return write(RLB_STRESS_REC_FD, r, sizeof(*r)) == (ssize_t)sizeof(*r) ? 0 : -1;
}

int rlb__stress_named(int rc, const char *text)
{
    return rc < 0 && rc > -RLB_E_COUNT_ && text && *text;
}
