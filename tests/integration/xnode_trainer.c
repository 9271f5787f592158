/* xnode_trainer.c: the trainer script of the multi-node tests (test_xnode.py), run by
 * `rlb launch --no-python` on every node with torchrun's environment.
 *
 *   xnode_trainer [--layout fsdp2|fsdp1] [--versions N] [--check]
 *                 [--republish N] (publish an aborted version again, up to N times)
 *                 [--die RANK:V:when]   when: before (kill -9 itself before publishing V),
 *                                       during (a helper kills it just after), or stall
 *                                       (sleep two minutes instead of publishing V)
 *
 * Each rank registers its FSDP shard of the tiny model (bridge_harness.c: rank = FSDP rank,
 * world = WORLD_SIZE, the weights a pure function of version, tensor and element) with its
 * node's bridge, then publishes versions from the bridge's committed version + 1 (so a
 * restarted group goes on) to N. With --check, local rank 0 reads every worker buffer of its
 * node after each commit (found through /proc: the memfd "rlb-weights-0" of each `rlb
 * worker` of this node's socket) and compares it element by element with the naive
 * reference of tests/unit/plan_ref.h (h_check_buffer).
 * Prints "synced V", "aborted V: reason", "done"; exits 0, or 3 after an abort, 1 on a
 * mismatch (naming the first wrong element), 77 when /proc/PID/mem cannot be read.
 */
#include <ctype.h>
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tests/integration/bridge_harness.h"

static long env_int(const char *name)
{
    const char *v = getenv(name);
    if (!v) {
        fprintf(stderr, "xnode_trainer: %s is not set (run it under rlb launch)\n", name);
        exit(2);
    }
    return atol(v);
}

/* The worker of this node with TP rank tp: its pid and TP size, or -1. */
static pid_t find_worker(const char *sock, int tp, int *tp_size)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    pid_t found = -1;
    while (d && found < 0 && (e = readdir(d))) {
        if (!isdigit((unsigned char)e->d_name[0]))
            continue;
        char path[300], args[4096];
        snprintf(path, sizeof(path), "/proc/%s/cmdline", e->d_name);
        int fd = open(path, O_RDONLY);
        ssize_t n = fd >= 0 ? read(fd, args, sizeof(args) - 1) : -1;
        if (fd >= 0)
            close(fd);
        if (n <= 0)
            continue;
        args[n] = 0;
        const char *argv[64];
        int argc = 0;
        for (ssize_t at = 0; at < n && argc < 64; at += (ssize_t)strlen(args + at) + 1)
            argv[argc++] = args + at;
        int worker = 0, mine = 0, rank = -1, size = 1;
        for (int i = 0; i < argc; i++) {
            worker |= !strcmp(argv[i], "worker");
            if (i + 1 < argc && !strcmp(argv[i], "--bridge"))
                mine = !strcmp(argv[i + 1], sock);
            if (i + 1 < argc && !strcmp(argv[i], "--tp-rank"))
                rank = atoi(argv[i + 1]);
            if (i + 1 < argc && !strcmp(argv[i], "--tp-size"))
                size = atoi(argv[i + 1]);
        }
        if (worker && mine && rank == tp) {
            found = (pid_t)atoi(e->d_name);
            *tp_size = size;
        }
    }
    if (d)
        closedir(d);
    return found;
}

/* Compares TP rank t's buffer with the reference of version v. Returns 0, 1 (mismatch,
 * printed) or 77 (cannot read it). */
static int check_worker(const char *sock, int t, uint64_t v, int rank)
{
    int T = 1;
    pid_t pid = find_worker(sock, t, &T);
    int rc = pid > 0 ? h_check_buffer(pid, 0, (uint32_t)t, (uint32_t)T, v) : 77;
    if (rc == 77)
        printf("check unavailable: worker TP rank %d of %s: %s\n", t, sock,
               pid > 0 ? "its buffer cannot be read" : "not found");
    if (rc == 1)
        printf("MISMATCH rank %d: version %" PRIu64 ", worker TP rank %d of %d\n", rank, v, t,
               T);
    if (!rc && t + 1 < T)
        return check_worker(sock, t + 1, v, rank);
    return rc;
}

/* Kills this process with SIGKILL after `us` microseconds, from a helper process. */
static void die_after(int us)
{
    pid_t me = getpid();
    if (fork() == 0) {
        struct timespec ts = {0, (long)us * 1000};
        nanosleep(&ts, NULL);
        kill(me, SIGKILL);
        _exit(0);
    }
}

int main(int argc, char **argv)
{
    h_layout layout = H_FSDP2;
    uint64_t versions = 20;
    int check = 0, die_rank = -1, republish = 0, tries = 0;
    uint64_t die_v = 0;
    char die_when[16] = "";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--layout") && i + 1 < argc)
            layout = !strcmp(argv[++i], "fsdp1") ? H_FSDP1 : H_FSDP2;
        else if (!strcmp(argv[i], "--versions") && i + 1 < argc)
            versions = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--check"))
            check = 1;
        else if (!strcmp(argv[i], "--republish") && i + 1 < argc)
            republish = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--die") && i + 1 < argc &&
                 sscanf(argv[++i], "%d:%" SCNu64 ":%15s", &die_rank, &die_v, die_when) == 3)
            continue;
        else {
            fprintf(stderr, "xnode_trainer: bad argument '%s'\n", argv[i]);
            return 2;
        }
    }
    int rank = (int)env_int("RANK"), world = (int)env_int("WORLD_SIZE");
    int local = (int)env_int("LOCAL_RANK");
    int restart = getenv("TORCHELASTIC_RESTART_COUNT") ? atoi(getenv("TORCHELASTIC_RESTART_COUNT")) : 0;
    const char *dir = getenv("RLB_SOCKET_DIR");
    h_run r;
    memset(&r, 0, sizeof(r));
    snprintf(r.sock, sizeof(r.sock), "%s/bridge", dir ? dir : ".");
    h_trainer t;
    int rc = h_trainer_open(&r, &t, (uint32_t)rank, (uint32_t)world, layout);
    if (rc) {
        printf("rank %d: cannot register: %s\n", rank, rlb_strerror(rc));
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (uint64_t v = rlb_weight_version(t.c) + 1; v <= versions; v++) {
        h_trainer_fill(&t, v);
        if (rank == die_rank && v == die_v && restart == 0) {
            printf("rank %d: dying %s version %" PRIu64 "\n", rank, die_when, v);
            if (!strcmp(die_when, "before"))
                kill(getpid(), SIGKILL);
            if (!strcmp(die_when, "stall"))
                sleep(120);
            die_after(2000);
        }
        rlb_sync_stats st = {.struct_size = sizeof(st)};
        rc = rlb_publish(t.c, v, &st);
        if (rc) {
            printf("aborted %" PRIu64 ": %s\n", v, rlb_last_error(t.c));
            /* What an RL trainer does after an abort: publish the same weights again. */
            if (rc == RLB_EABORTED && tries++ < republish) {
                v--;
                continue;
            }
            return 3;
        }
        printf("synced %" PRIu64 " (%.2f ms)\n", v, st.ms);
        if (check && local == 0 && (rc = check_worker(r.sock, 0, v, rank)) != 0)
            return rc;
    }
    printf("done\n");
    h_trainer_close(&t);
    return 0;
}
