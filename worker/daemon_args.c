/* daemon_args.c: what the daemon commands (`rlb worker`, `rlb bridge`) share besides their
 * options: stopping on signals, and the backend options (numbers through common/cli_args.h). */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cli_args.h"
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

int rlb__backend_optarg(const char *cmd, int c, const char *arg, rlb_worker_opts *o)
{
    static const struct {
        const char *name;
        rlb_dtype dtype;
    } dtypes[] = {{"bf16", RLB_DTYPE_BF16}, {"fp16", RLB_DTYPE_F16}, {"fp32", RLB_DTYPE_F32}};
    uint64_t gpu;
    char *end;
    switch (c - RLB_BACKEND_OPT_BASE) {
    case 0:
        if (rlb__device_parse(arg, &o->device) == 0)
            return 0;
        fprintf(stderr, "rlb %s: --device is auto, cpu or cuda, not '%s'\n", cmd, arg);
        return 2;
    case 1:
        if (rlb__cli_u64(cmd, "gpu", arg, 0, 255, &gpu))
            return 2;
        o->cuda_device = (int)gpu;
        return 0;
    case 2:
        for (size_t i = 0; i < sizeof dtypes / sizeof dtypes[0]; i++)
            if (!strcmp(arg, dtypes[i].name)) {
                o->dtype = dtypes[i].dtype;
                return 0;
            }
        fprintf(stderr, "rlb %s: --dtype is bf16, fp16 or fp32, not '%s'\n", cmd, arg);
        return 2;
    case 3:
        if (rlb__quant_parse(arg, &o->quant) == 0)
            return 0;
        fprintf(stderr, "rlb %s: --quant is none, int8, fp8 or fp8-channel, not '%s'\n", cmd,
                arg);
        return 2;
    case 4:
        errno = 0;
        o->gpu_memory_utilization = strtod(arg, &end);
        if (!*arg || *end || errno || !(o->gpu_memory_utilization > 0) ||
            o->gpu_memory_utilization > 1) {
            fprintf(stderr, "rlb %s: --gpu-memory-utilization is a number in (0, 1], not "
                    "'%s'\n", cmd, arg);
            return 2;
        }
        return 0;
    case 5:
        o->no_graphs = 1;
        return 0;
    case 6:
        o->batch_invariant = 1;
        return 0;
    }
    return 1;
}