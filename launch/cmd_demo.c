/* cmd_demo.c: `rlb demo`, the README's main command. It starts, as child processes, an
 * rlb-bridge and two rlb-workers on the CPU backend with the built-in tiny model (`rlb
 * bridge --tiny`, `rlb worker --tiny`), waits until both replicas serve, then runs the toy
 * trainer (examples/toy_trainer.c, the rlb-toy-trainer program next to this one) for about
 * 50 evolution-strategies steps; the trainer prints one line per step: weight version,
 * sync ms and GB/s, generation tokens/s, mean reward.
 *
 * Everything lives in a private temporary directory (socket and daemon logs). Children run
 * in their own process group and die with us (PR_SET_PDEATHSIG), so Ctrl-C reaches only
 * this process, which then stops them in order (trainer, workers, bridge: SIGTERM, SIGKILL
 * after a grace period), removes the directory and checks that /dev/shm holds nothing new
 * of rlbridge's (common/shm.h: rlb__shm_entry_ours).
 * A daemon's log is shown when it fails. Exit status: the trainer's (0 when it ran to the
 * end), 1 when the demo could not run, 2 on bad usage, 130 after Ctrl-C.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bridge/bridge.h"
#include "common/cli_args.h"
#include "common/clock.h"
#include "common/shm.h"
#include "launch/cmds.h"
#include "rlb/rlb.h"
#include "worker/backends.h"

#define REPLICAS 2
#define READY_TIMEOUT_MS 30000 /* bridge socket up and every replica serving */
#define GRACE_MS 3000          /* after SIGTERM, before SIGKILL */
#define MAX_SHM_NAMES 256      /* /dev/shm entries remembered before the run */

enum { CHILD_BRIDGE, CHILD_WORKER0, CHILD_TRAINER = CHILD_WORKER0 + REPLICAS, N_CHILDREN };

typedef struct demo {
    char dir[64];              /* private temporary directory */
    char socket[128];          /* dir/bridge */
    char self[PATH_MAX];       /* this program */
    char trainer[PATH_MAX];    /* rlb-toy-trainer */
    pid_t pid[N_CHILDREN];     /* 0 = not running */
    int status[N_CHILDREN];    /* wait status once reaped */
    char *shm_before[MAX_SHM_NAMES]; /* /dev/shm entries before the run */
    int n_shm_before;          /* entries in shm_before */
} demo;

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
    interrupted = sig;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static const char *child_name(int i)
{
    return i == CHILD_BRIDGE ? "bridge" : i == CHILD_TRAINER ? "trainer" : "worker";
}

/* Starts argv as child i; its output goes to log (NULL = ours). Returns 0 or -1. */
static int spawn(demo *d, int i, char *const argv[], const char *log)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        perror("rlb demo: fork");
        return -1;
    }
    if (pid == 0) {
        setpgid(0, 0); /* Ctrl-C goes to the demo alone, which stops us in order */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(1);
        if (log) {
            int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
            if (fd < 0 || dup2(fd, STDOUT_FILENO) < 0 || dup2(fd, STDERR_FILENO) < 0)
                _exit(1);
        }
        execv(argv[0], argv);
        fprintf(stderr, "rlb demo: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    d->pid[i] = pid;
    return 0;
}

/* Reaps children that exited; returns the index of one that died, or -1. */
static int reap(demo *d)
{
    int died = -1;
    for (int i = 0; i < N_CHILDREN; i++) {
        if (d->pid[i] <= 0)
            continue;
        if (waitpid(d->pid[i], &d->status[i], WNOHANG) == d->pid[i]) {
            d->pid[i] = 0;
            died = i;
        }
    }
    return died;
}

static void log_path(const demo *d, int i, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s/%s%d.log", d->dir, child_name(i), i == CHILD_BRIDGE ? 0 : i - 1);
}

static void show_log(const demo *d, int i)
{
    char path[256], line[512];
    log_path(d, i, path, sizeof(path));
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    fprintf(stderr, "---- %s log (%s) ----\n", child_name(i), path);
    while (fgets(line, sizeof(line), f))
        fputs(line, stderr);
    fclose(f);
}

/* Stops child i: SIGTERM, then SIGKILL after the grace period; reaps it. */
static void stop_child(demo *d, int i)
{
    if (d->pid[i] <= 0)
        return;
    kill(d->pid[i], SIGTERM);
    int64_t deadline = rlb__clock_ms() + GRACE_MS;
    while (waitpid(d->pid[i], &d->status[i], WNOHANG) == 0) {
        if (rlb__clock_ms() > deadline) {
            fprintf(stderr, "rlb demo: %s (pid %d) ignored SIGTERM; killing it\n",
                    child_name(i), (int)d->pid[i]);
            kill(d->pid[i], SIGKILL);
            waitpid(d->pid[i], &d->status[i], 0);
            break;
        }
        sleep_ms(10);
    }
    d->pid[i] = 0;
}

/* Waits until the bridge's socket exists (workers refuse a missing bridge) or, with
 * replicas > 0, until the bridge answers with that many replicas up. Returns 0 or -1. */
static int wait_ready(demo *d, int replicas)
{
    int64_t deadline = rlb__clock_ms() + READY_TIMEOUT_MS;
    rlb_client_options o;
    rlb_client_options_init(&o);
    o.socket = d->socket;
    o.observer = 1;
    o.connect_timeout_ms = 1000;
    o.request_timeout_ms = 2000;
    while (!interrupted && rlb__clock_ms() < deadline) {
        int died = reap(d);
        if (died >= 0) {
            fprintf(stderr, "rlb demo: the %s exited while starting\n", child_name(died));
            show_log(d, died);
            return -1;
        }
        rlb_client *c = NULL;
        rlb_stat_list *l = NULL;
        double up = 0;
        struct stat st;
        int listening = stat(d->socket, &st) == 0;
        if (listening && replicas == 0)
            return 0;
        if (listening && rlb_connect(&o, &c) == 0 && rlb_bridge_stats(c, &l) == 0)
            rlb_stat_list_find(l, "replicas_up", &up);
        rlb_stat_list_free(l);
        rlb_close(c);
        if (replicas > 0 && up >= replicas)
            return 0;
        sleep_ms(50);
    }
    if (!interrupted) {
        fprintf(stderr, "rlb demo: the %s did not come up within %d s\n",
                replicas ? "workers" : "bridge", READY_TIMEOUT_MS / 1000);
        show_log(d, CHILD_BRIDGE);
    }
    return -1;
}

static int find_programs(demo *d)
{
    ssize_t n = readlink("/proc/self/exe", d->self, sizeof(d->self) - 1);
    if (n <= 0) {
        perror("rlb demo: /proc/self/exe");
        return -1;
    }
    d->self[n] = 0;
    snprintf(d->trainer, sizeof(d->trainer), "%s", d->self);
    char *slash = strrchr(d->trainer, '/');
    size_t dir_len = slash ? (size_t)(slash - d->trainer) + 1 : 0;
    snprintf(d->trainer + dir_len, sizeof(d->trainer) - dir_len, "rlb-toy-trainer");
    if (access(d->trainer, X_OK) != 0) {
        fprintf(stderr, "rlb demo: %s is missing; build it (cmake --build <build dir> "
                        "--target rlb-toy-trainer)\n", d->trainer);
        return -1;
    }
    return 0;
}

static void shm_snapshot(demo *d)
{
    DIR *dir = opendir("/dev/shm");
    struct dirent *e;
    while (dir && (e = readdir(dir)) && d->n_shm_before < MAX_SHM_NAMES)
        if (e->d_name[0] != '.')
            d->shm_before[d->n_shm_before++] = strdup(e->d_name);
    if (dir)
        closedir(dir);
}

/* Prints what appeared in /dev/shm during the run; returns how many entries. */
static int shm_new_entries(demo *d)
{
    DIR *dir = opendir("/dev/shm");
    struct dirent *e;
    int n = 0;
    while (dir && (e = readdir(dir))) {
        /* only rlbridge's own segments: another program's (another run's UCX, say) may
         * come and go meanwhile on a shared machine */
        int seen = e->d_name[0] == '.' || !rlb__shm_entry_ours(e->d_name);
        for (int i = 0; !seen && i < d->n_shm_before; i++)
            seen = d->shm_before[i] && !strcmp(d->shm_before[i], e->d_name);
        if (!seen) {
            fprintf(stderr, "rlb demo: left in /dev/shm: %s\n", e->d_name);
            n++;
        }
    }
    if (dir)
        closedir(dir);
    return n;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: rlb demo [--steps N] [--mode pause|staged] [--seed N] "
               "[--device auto|cpu|cuda]\n"
               "  Starts a bridge and %d workers (built-in tiny model; on the GPU when one is\n"
               "  visible, else the CPU) and trains the tiny model with evolution strategies\n"
               "  through librlb for N steps (default 50).\n",
            REPLICAS);
}

/* Runs the demo's processes; returns the exit status. */
static int run(demo *d, const char *steps, const char *mode, const char *seed, int gpu)
{
    char log[256], replica[16], replicas[16];
    log_path(d, CHILD_BRIDGE, log, sizeof(log));
    char *bridge[] = {d->self, "bridge", "--socket", d->socket, "--tiny", "--mode",
                      (char *)mode, "--threads", "1", NULL};
    if (spawn(d, CHILD_BRIDGE, bridge, log) < 0)
        return 1;
    if (wait_ready(d, 0) < 0)
        return interrupted ? 130 : 1;
    snprintf(replicas, sizeof(replicas), "%d", REPLICAS);
    for (int r = 0; r < REPLICAS; r++) {
        snprintf(replica, sizeof(replica), "%d", r);
        log_path(d, CHILD_WORKER0 + r, log, sizeof(log));
        /* On a GPU the workers keep float32 weights: evolution strategies' small
         * perturbations would drown in bf16 rounding. */
        char *worker[] = {d->self, "worker", "--bridge", d->socket, "--replica", replica,
                          "--replicas", replicas, "--tiny", "--threads", "1", "--device",
                          gpu ? "cuda" : "cpu", "--dtype", "fp32", NULL};
        if (spawn(d, CHILD_WORKER0 + r, worker, log) < 0)
            return 1;
    }
    if (wait_ready(d, REPLICAS) < 0)
        return interrupted ? 130 : 1;
    printf("rlb demo: bridge and %d workers up (%s backend, tiny model, %s sync)\n",
           REPLICAS, gpu ? "CUDA" : "CPU", mode);
    fflush(stdout);
    char *trainer[] = {d->trainer, "--socket", d->socket, "--steps", (char *)steps,
                       "--seed", (char *)seed, NULL};
    if (spawn(d, CHILD_TRAINER, trainer, NULL) < 0)
        return 1;
    while (!interrupted && d->pid[CHILD_TRAINER] > 0) {
        int died = reap(d);
        if (died >= 0 && died != CHILD_TRAINER) {
            fprintf(stderr, "rlb demo: the %s exited during training\n", child_name(died));
            show_log(d, died);
            return 1;
        }
        sleep_ms(20);
    }
    if (interrupted)
        return 130;
    int st = d->status[CHILD_TRAINER];
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}

int rlb__cmd_demo(int argc, char **argv)
{
    static const struct option longopts[] = {{"steps", required_argument, NULL, 's'},
                                             {"mode", required_argument, NULL, 'm'},
                                             {"seed", required_argument, NULL, 'S'},
                                             {"device", required_argument, NULL, 'd'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    const char *mode = "pause";
    long n_steps = 50;
    uint64_t seed_v = 1;
    rlb_sync_mode sync;
    rlb_device device = rlb__backend_device_env();
    int c, rc = 0;
    optind = 1;
    while (rc == 0 && (c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 's': rc = rlb__cli_long("demo", "steps", optarg, 1, 100000, &n_steps); break;
        case 'm':
            mode = optarg;
            if (rlb__sync_mode_parse(mode, &sync) < 0)
                rc = rlb__cli_bad("demo", "mode", optarg, "pause or staged");
            break;
        case 'S': rc = rlb__cli_u64("demo", "seed", optarg, 0, UINT64_MAX, &seed_v); break;
        case 'd':
            if (rlb__device_parse(optarg, &device) < 0)
                rc = rlb__cli_bad("demo", "device", optarg, "auto, cpu or cuda");
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (rc)
        return rc;
    if (optind < argc) {
        fprintf(stderr, "rlb demo: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    /* the trainer reads them in decimal */
    char steps[24], seed[24];
    snprintf(steps, sizeof steps, "%ld", n_steps);
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)seed_v);
    demo *d = calloc(1, sizeof(*d));
    if (!d || find_programs(d) < 0) {
        free(d);
        return 1;
    }
    strcpy(d->dir, "/tmp/rlb-demo-XXXXXX");
    if (!mkdtemp(d->dir)) {
        perror("rlb demo: mkdtemp");
        free(d);
        return 1;
    }
    snprintf(d->socket, sizeof(d->socket), "%s/bridge", d->dir);
    shm_snapshot(d);
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    int64_t t0 = rlb__clock_ms();
    int gpu = rlb__backend_resolve(device) == RLB_DEVICE_CUDA;
    if (gpu && strcmp(mode, "pause")) {
        printf("rlb demo: GPU workers sync in pause mode only for now; the %s demo runs on "
               "the CPU\n", mode);
        gpu = 0;
    }
    rc = run(d, steps, mode, seed, gpu);
    if (interrupted)
        fprintf(stderr, "\nrlb demo: interrupted; stopping everything\n");
    /* The trainer first (it is a client), then the workers, then the bridge. */
    stop_child(d, CHILD_TRAINER);
    for (int r = 0; r < REPLICAS; r++)
        stop_child(d, CHILD_WORKER0 + r);
    stop_child(d, CHILD_BRIDGE);
    for (int i = 0; i < N_CHILDREN; i++) {
        char path[256];
        log_path(d, i, path, sizeof(path));
        unlink(path);
    }
    unlink(d->socket); /* only there if the bridge could not remove it */
    if (rmdir(d->dir) != 0)
        fprintf(stderr, "rlb demo: could not remove %s: %s\n", d->dir, strerror(errno));
    int left = shm_new_entries(d);
    printf("rlb demo: %s after %.1f s; every process stopped, %s\n",
           rc == 0 ? "done" : "stopped", (rlb__clock_ms() - t0) / 1000.0,
           left ? "but /dev/shm holds new entries (see above)" : "nothing left in /dev/shm");
    for (int i = 0; i < d->n_shm_before; i++)
        free(d->shm_before[i]);
    free(d);
    return rc == 0 && left ? 1 : rc;
}
