/* cmd_launch.c: `rlb launch`, a drop-in for torchrun that also starts and wires the node's
 * rlbridge processes. Per node: join the rendezvous (launch_rdzv.c; node 0 runs the store),
 * start the bridge and the workers in a private socket directory and wait until every
 * replica serves, then start --nproc-per-node trainer processes with torchrun's
 * environment plus RLB_SOCKET_DIR, and supervise them.
 *
 * Supervision, as torchrun's agent does it: a failing trainer process stops the others of
 * the group; within --max-restarts the group is started again (on every node: the restart
 * count lives in the store), while the bridge and workers stay up with the last committed
 * version. SIGINT, SIGTERM, SIGHUP and SIGQUIT are forwarded to the trainers, then
 * everything is stopped in order (trainers, workers, bridge; SIGTERM, SIGKILL after a grace
 * period). The exit status is the worst trainer's (128 + signal for a signalled one).
 *
 * Every child runs in a process group of its own (so a trainer's own children stop with
 * it) and has PR_SET_PDEATHSIG. A watchdog process forked first, before any thread, holds
 * the read end of a pipe to which we write each group and the socket directory: when the
 * launcher dies, even by kill -9, the pipe reaches EOF and the watchdog stops every group
 * and removes the directory, so nothing is orphaned and nothing is left behind. Each line a
 * child writes reaches our stdout or stderr prefixed by its process ("[trainer 3] ...",
 * "[worker 1.0] ...", "[bridge] ..."), and, with --log-dir and --redirects/--tee, its
 * trainer's log file as torchrun lays them out.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "launch/cmds.h"
#include "launch/launch.h"
#include "common/clock.h"
#include "common/store.h"
#include "rlb/rlb.h"

extern char **environ;

#define READY_TIMEOUT_MS 60000 /* bridge socket up and every replica serving */
#define GRACE_MS 3000          /* after SIGTERM, before SIGKILL */
#define LINE_MAX_BYTES 8192    /* a longer line is cut and emitted in pieces */

enum { KIND_BRIDGE, KIND_WORKER, KIND_TRAINER };

typedef struct child {
    int kind;                  /* KIND_* */
    int local_rank;            /* trainers: LOCAL_RANK */
    char prefix[32];           /* "[trainer 3]" */
    pid_t pid;                 /* 0 = not running; also its process group */
    int status;                /* wait status once reaped */
    int fd[2];                 /* read ends of its stdout and stderr pipes; -1 = closed */
    int console[2];            /* whether each stream is shown on our console */
    int file[2];               /* log file of each stream; -1 = none */
    char line[2][LINE_MAX_BYTES]; /* the partial line of each stream */
    size_t have[2];            /* bytes in line[] */
} child;

typedef struct launcher {
    rlb_launch_opts o;         /* the options */
    rlb_rdzv rdzv;             /* the rendezvous and the store connection */
    char self[PATH_MAX];       /* this program, to run `rlb bridge` / `rlb worker` */
    char ifname[64];           /* --local-addr's interface ("" without the option) */
    int loopback;              /* ... is a loopback interface */
    char dir[64];              /* socket directory /tmp/rlb-launch-<our pid>-*; "" = none */
    char socket[128];          /* dir/bridge */
    char log_root[PATH_MAX];   /* --log-dir/<run id>; "" = no log files */
    child *kids;               /* bridge, workers, trainers */
    int n_kids;                /* entries in kids */
    int first_trainer;         /* index of trainer local rank 0 in kids */
    int watchdog;              /* write end of the watchdog's pipe */
    int attempt;               /* the restart count of the running trainer group */
    int signal_pipe[2];        /* the signal handler writes the signal number here */
} launcher;

static volatile sig_atomic_t interrupted;
static int signal_wfd = -1;

static void on_signal(int sig)
{
    interrupted = sig;
    unsigned char b = (unsigned char)sig;
    ssize_t n = write(signal_wfd, &b, 1);
    (void)n;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- the watchdog ------------------------------------------------------------------- */

/* Removes the files of dir, then dir (the socket directory holds no subdirectories). */
static void remove_dir(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[PATH_MAX];
    while (d && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        unlink(path);
    }
    if (d)
        closedir(d);
    rmdir(dir);
}

/* The watchdog's life: collect "pg PID" and "dir PATH" lines until "done" (a clean exit of
 * the launcher: nothing to do) or EOF (the launcher died: stop every group, clean up). */
static void watchdog_main(int rfd)
{
    pid_t groups[4096];
    int n = 0, node = -1, port = 0;
    char dir[PATH_MAX] = "", line[PATH_MAX + 8], addr[256] = "", run_id[RLB_STORE_RUN_ID_MAX];
    FILE *f = fdopen(rfd, "r");
    while (f && fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = 0;
        if (!strcmp(line, "done"))
            _exit(0);
        if (!strncmp(line, "pg ", 3) && n < (int)(sizeof(groups) / sizeof(groups[0])))
            groups[n++] = (pid_t)atoi(line + 3);
        else if (!strncmp(line, "dir ", 4) && strlen(line + 4) < sizeof(dir))
            memcpy(dir, line + 4, strlen(line + 4) + 1);
        else if (sscanf(line, "store %d %255s %d %127s", &node, addr, &port, run_id) != 4)
            node = -1;
    }
    rlb_store *st = NULL;
    if (node >= 0 && rlb__store_connect(addr, port, run_id, 1000, &st, NULL, 0) == 0) {
        int len = snprintf(line, sizeof(line), "node %d: its launcher died", node);
        rlb__store_set(st, "abort", line, (size_t)len); /* the other nodes stop too */
        rlb__store_close(st);
    }
    int alive = 0;
    for (int i = 0; i < n; i++)
        alive += kill(-groups[i], SIGTERM) == 0;
    long long deadline = rlb__clock_ms() + GRACE_MS;
    while (alive && rlb__clock_ms() < deadline) {
        sleep_ms(20);
        alive = 0;
        for (int i = 0; i < n; i++)
            alive += kill(-groups[i], 0) == 0;
    }
    for (int i = 0; i < n; i++)
        kill(-groups[i], SIGKILL);
    if (dir[0]) {
        sleep_ms(50); /* the killed bridge's socket file is ours to remove now */
        remove_dir(dir);
    }
    if (n)
        fprintf(stderr, "rlb launch: the launcher died; its watchdog stopped %d process "
                        "group(s)%s\n", n, dir[0] ? " and removed the socket directory" : "");
    _exit(0);
}

/* Forks the watchdog; returns the write end of its pipe, or -1. */
static int watchdog_start(void)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(p[0]);
        close(p[1]);
        return -1;
    }
    if (pid == 0) {
        close(p[1]);
        signal(SIGINT, SIG_IGN); /* the launcher forwards signals; we only watch it */
        signal(SIGTERM, SIG_IGN);
        signal(SIGHUP, SIG_IGN);
        signal(SIGQUIT, SIG_IGN);
        signal(SIGPIPE, SIG_IGN);
        int null = open("/dev/null", O_RDWR);
        if (null >= 0)
            dup2(null, STDOUT_FILENO); /* whoever reads our stdout sees EOF with us */
        watchdog_main(p[0]);
    }
    close(p[0]);
    return p[1];
}

static void watchdog_say(launcher *L, const char *fmt, ...)
{
    char line[PATH_MAX + 512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (L->watchdog >= 0 && write(L->watchdog, line, (size_t)n) != n)
        fprintf(stderr, "rlb launch: cannot reach the watchdog: %s\n", strerror(errno));
}

/* ---- output --------------------------------------------------------------------------- */

/* Writes one line (without its newline) to the console and the log file of stream s. */
static void emit(child *c, int s, const char *line, size_t len)
{
    if (c->console[s]) {
        char buf[LINE_MAX_BYTES + 64];
        size_t p = (size_t)snprintf(buf, sizeof(buf), "%s ", c->prefix);
        memcpy(buf + p, line, len);
        buf[p + len] = '\n';
        ssize_t n = write(s ? STDERR_FILENO : STDOUT_FILENO, buf, p + len + 1);
        (void)n; /* a closed console must not stop the job */
    }
    if (c->file[s] >= 0) {
        struct iovec iov[2] = {{(void *)line, len}, {"\n", 1}};
        ssize_t n = writev(c->file[s], iov, 2);
        (void)n;
    }
}

/* Reads what stream s of c has; emits whole lines. At EOF emits the rest and closes. */
static void pump(child *c, int s)
{
    ssize_t n = read(c->fd[s], c->line[s] + c->have[s], sizeof(c->line[s]) - c->have[s]);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return;
    if (n > 0)
        c->have[s] += (size_t)n;
    size_t start = 0;
    for (size_t i = 0; i < c->have[s]; i++) {
        if (c->line[s][i] == '\n') {
            emit(c, s, c->line[s] + start, i - start);
            start = i + 1;
        }
    }
    memmove(c->line[s], c->line[s] + start, c->have[s] - start);
    c->have[s] -= start;
    if (c->have[s] == sizeof(c->line[s]) || (n <= 0 && c->have[s])) {
        emit(c, s, c->line[s], c->have[s]);
        c->have[s] = 0;
    }
    if (n <= 0) {
        close(c->fd[s]);
        c->fd[s] = -1;
        if (c->file[s] >= 0)
            close(c->file[s]);
        c->file[s] = -1;
    }
}

/* Reaps children that exited; returns the index of one that did, or -1. */
static int reap(launcher *L)
{
    int died = -1;
    for (int i = 0; i < L->n_kids; i++) {
        child *c = &L->kids[i];
        if (c->pid > 0 && waitpid(c->pid, &c->status, WNOHANG) == c->pid) {
            c->pid = 0;
            if (died < 0)
                died = i;
        }
    }
    return died;
}

/* Waits up to ms for output, a signal or a child's exit, and handles the output. */
static void serve_io(launcher *L, int ms)
{
    struct pollfd p[1 + 2 * 4096];
    int who[1 + 2 * 4096], n = 0;
    p[n++] = (struct pollfd){.fd = L->signal_pipe[0], .events = POLLIN};
    for (int i = 0; i < L->n_kids && n < (int)(sizeof(p) / sizeof(p[0])) - 1; i++) {
        for (int s = 0; s < 2; s++) {
            if (L->kids[i].fd[s] >= 0) {
                who[n] = i * 2 + s;
                p[n++] = (struct pollfd){.fd = L->kids[i].fd[s], .events = POLLIN};
            }
        }
    }
    if (poll(p, (nfds_t)n, ms) <= 0)
        return;
    if (p[0].revents) {
        unsigned char b[16];
        ssize_t r = read(L->signal_pipe[0], b, sizeof(b));
        (void)r; /* `interrupted` says which signal */
    }
    for (int j = 1; j < n; j++)
        if (p[j].revents)
            pump(&L->kids[who[j] / 2], who[j] % 2);
}

/* ---- children --------------------------------------------------------------------------- */

/* Starts argv (PATH searched) as child c with environment envp. Returns 0 or -1. */
static int spawn(launcher *L, child *c, char *const argv[], char *const envp[])
{
    int out[2] = {-1, -1}, err[2] = {-1, -1};
    if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
        perror("rlb launch: pipe");
        goto fail;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        perror("rlb launch: fork");
        goto fail;
    }
    if (pid == 0) {
        setpgid(0, 0); /* its own group: stopping it stops what it started */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(1);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        if (dup2(out[1], STDOUT_FILENO) < 0 || dup2(err[1], STDERR_FILENO) < 0)
            _exit(1);
        execvpe(argv[0], argv, envp);
        fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid); /* also here: no window in which a signal to the group misses it */
    close(out[1]);
    close(err[1]);
    c->pid = pid;
    c->fd[0] = out[0];
    c->fd[1] = err[0];
    c->have[0] = c->have[1] = 0;
    watchdog_say(L, "pg %d\n", (int)pid);
    return 0;
fail:
    for (int i = 0; i < 2; i++) {
        if (out[i] >= 0)
            close(out[i]);
        if (err[i] >= 0)
            close(err[i]);
    }
    return -1;
}

/* Sends sig to the groups of the children of the kinds in mask, then waits up to ms for
 * them to exit (pumping their output), then kills what is left. */
static void stop_kind(launcher *L, int kind, int sig, int ms)
{
    for (int i = 0; i < L->n_kids; i++)
        if (L->kids[i].kind == kind && L->kids[i].pid > 0)
            kill(-L->kids[i].pid, sig);
    long long deadline = rlb__clock_ms() + ms;
    for (;;) {
        int alive = 0, open_fds = 0;
        reap(L);
        for (int i = 0; i < L->n_kids; i++) {
            child *c = &L->kids[i];
            if (c->kind != kind)
                continue;
            alive += c->pid > 0;
            open_fds += (c->fd[0] >= 0) + (c->fd[1] >= 0);
        }
        if (!alive && !open_fds)
            return;
        if (rlb__clock_ms() > deadline) {
            for (int i = 0; i < L->n_kids; i++) {
                child *c = &L->kids[i];
                if (c->kind != kind)
                    continue;
                if (c->pid > 0) {
                    fprintf(stderr, "rlb launch: %s (pid %d) ignored SIGTERM; killing it\n",
                            c->prefix, (int)c->pid);
                    kill(-c->pid, SIGKILL);
                    waitpid(c->pid, &c->status, 0);
                    c->pid = 0;
                }
                for (int s = 0; s < 2; s++) /* a grandchild may still hold the pipe */
                    if (c->fd[s] >= 0) {
                        close(c->fd[s]);
                        c->fd[s] = -1;
                    }
            }
            return;
        }
        serve_io(L, 20);
    }
}

/* Waits until the bridge's socket exists or, with replicas > 0, until the bridge counts that
 * many replicas up. Returns 0 or -1 (a daemon died, the time ran out, or a signal). */
static int wait_ready(launcher *L, int replicas)
{
    long long deadline = rlb__clock_ms() + READY_TIMEOUT_MS;
    rlb_client_options co;
    rlb_client_options_init(&co);
    co.socket = L->socket;
    co.observer = 1;
    co.connect_timeout_ms = 1000;
    co.request_timeout_ms = 2000;
    while (!interrupted && rlb__clock_ms() < deadline) {
        int died = reap(L);
        if (died >= 0) {
            serve_io(L, 100); /* its last words */
            fprintf(stderr, "rlb launch: node %d: %s exited while starting\n",
                    L->rdzv.node_rank, L->kids[died].prefix);
            return -1;
        }
        struct stat st;
        int listening = stat(L->socket, &st) == 0;
        if (listening && replicas == 0)
            return 0;
        rlb_client *cl = NULL;
        rlb_stat_list *sl = NULL;
        double up = 0;
        if (listening && rlb_connect(&co, &cl) == 0 && rlb_bridge_stats(cl, &sl) == 0)
            rlb_stat_list_find(sl, "replicas_up", &up);
        rlb_stat_list_free(sl);
        rlb_close(cl);
        if (replicas > 0 && up >= replicas)
            return 0;
        serve_io(L, 50);
    }
    if (!interrupted)
        fprintf(stderr, "rlb launch: node %d: the %s did not come up within %d s\n",
                L->rdzv.node_rank, replicas ? "workers" : "bridge", READY_TIMEOUT_MS / 1000);
    return -1;
}

/* An environment: ours with the n given NAME=value entries put over it. */
static char **env_over(char *const *set, int n)
{
    size_t have = 0;
    while (environ[have])
        have++;
    char **env = calloc(have + (size_t)n + 1, sizeof(*env));
    if (!env)
        return NULL;
    size_t k = 0;
    for (size_t i = 0; i < have; i++) {
        size_t name = strcspn(environ[i], "=");
        int replaced = 0;
        for (int j = 0; j < n && !replaced; j++)
            replaced = !strncmp(set[j], environ[i], name) && set[j][name] == '=';
        if (!replaced)
            env[k++] = environ[i];
    }
    for (int j = 0; j < n; j++)
        env[k++] = set[j];
    return env;
}

/* Starts the bridge and the workers of this node and waits until they serve. */
static int start_rollout(launcher *L)
{
    const rlb_launch_opts *o = &L->o;
    char dev[64], sockdir[96], ucx[96], nccl[96];
    snprintf(dev, sizeof(dev), "RLB_DEVICE=%s", o->device);
    snprintf(sockdir, sizeof(sockdir), "RLB_SOCKET_DIR=%s", L->dir);
    char *set[4] = {dev, sockdir};
    int n_set = 2;
    /* --local-addr: the bridges' transports use its interface, unless the user chose one */
    if (L->ifname[0] && !getenv("UCX_NET_DEVICES")) {
        snprintf(ucx, sizeof(ucx), "UCX_NET_DEVICES=%s", L->ifname);
        set[n_set++] = ucx;
    }
    if (L->ifname[0] && !getenv("NCCL_SOCKET_IFNAME")) {
        snprintf(nccl, sizeof(nccl), "NCCL_SOCKET_IFNAME=%s", L->ifname);
        set[n_set++] = nccl;
    }
    char **env = env_over(set, n_set);
    if (!env)
        return -1;
    int rc = -1;
    child *b = &L->kids[0];
    char nnodes[16], node[16], ranks[32], store[300];
    snprintf(nnodes, sizeof(nnodes), "%d", L->rdzv.nnodes);
    snprintf(node, sizeof(node), "%d", L->rdzv.node_rank);
    snprintf(ranks, sizeof(ranks), "%d:%d", L->rdzv.node_rank * o->nproc, o->nproc);
    snprintf(store, sizeof(store), "%s:%d", L->rdzv.store_addr, L->rdzv.store_port);
    /* several nodes: the bridges meet through the store (bridge/xnode.h) */
    char *bridge[] = {L->self, "bridge", "--socket", L->socket, "--mode", (char *)o->mode,
                      "--nnodes", nnodes, "--node-rank", node, "--ranks", ranks, "--store",
                      store, "--run-id", (char *)o->rdzv_id,
                      o->model ? "--model" : "--tiny", (char *)o->model, NULL};
    if (spawn(L, b, bridge, env) < 0 || wait_ready(L, 0) < 0)
        goto out;
    char replica[16], replicas[16], tp_rank[16], tp[16], gpu[16], util[32];
    snprintf(replicas, sizeof(replicas), "%d", o->rollout_replicas);
    snprintf(tp, sizeof(tp), "%d", o->rollout_tp);
    /* GPU workers go round the visible GPUs, one TP rank per GPU where there are enough;
     * workers that share a GPU split --gpu-memory-utilization between them. */
    int workers = L->first_trainer - 1;
    int gpus = strcmp(o->device, "cpu") ? rlb__launch_count_gpus() : 0;
    int per_gpu = gpus ? (workers + gpus - 1) / gpus : 1;
    snprintf(util, sizeof(util), "%.4f", o->gpu_mem_util / per_gpu);
    for (int i = 1; i < L->first_trainer; i++) {
        int d = (i - 1) / o->rollout_tp, t = (i - 1) % o->rollout_tp;
        snprintf(replica, sizeof(replica), "%d", d);
        snprintf(tp_rank, sizeof(tp_rank), "%d", t);
        snprintf(gpu, sizeof(gpu), "%d", gpus ? (i - 1) % gpus : 0);
        char *worker[24] = {L->self, "worker", "--bridge", L->socket, "--replica", replica,
                            "--replicas", replicas, "--tp-rank", tp_rank, "--tp-size", tp,
                            "--quant", (char *)o->quant};
        int n = 14;
        if (o->model) {
            worker[n++] = "--model";
            worker[n++] = (char *)o->model;
        } else {
            worker[n++] = "--tiny";
        }
        if (gpus) {
            worker[n++] = "--gpu";
            worker[n++] = gpu;
            worker[n++] = "--gpu-memory-utilization";
            worker[n++] = util;
        }
        worker[n] = NULL;
        if (spawn(L, &L->kids[i], worker, env) < 0)
            goto out;
    }
    rc = wait_ready(L, o->rollout_replicas);
out:
    free(env);
    return rc;
}

/* Opens log file attempt_<n>/<local_rank>/<name> under the log root (torchrun's layout). */
static int open_log(launcher *L, int local_rank, const char *name)
{
    char path[PATH_MAX + 64];
    if (snprintf(path, sizeof(path), "%s/attempt_%d", L->log_root, L->attempt) >= PATH_MAX)
        return -1;
    mkdir(path, 0755);
    size_t n = strlen(path);
    snprintf(path + n, sizeof(path) - n, "/%d", local_rank);
    mkdir(path, 0755);
    n = strlen(path);
    snprintf(path + n, sizeof(path) - n, "/%s", name);
    return open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
}

/* Starts the trainer group (attempt L->attempt) with torchrun's environment. */
static int start_trainers(launcher *L)
{
    const rlb_launch_opts *o = &L->o;
    const rlb_rdzv *r = &L->rdzv;
    int world = r->nnodes * o->nproc;
    const char *py = getenv("PYTHON_EXEC");
    char *argv[o->script_argc + 4];
    int a = 0;
    if (!o->no_python) {
        argv[a++] = (char *)(py && *py ? py : "python3");
        argv[a++] = "-u";
        if (o->module)
            argv[a++] = "-m";
    }
    for (int i = 0; i < o->script_argc; i++)
        argv[a++] = o->script_argv[i];
    argv[a] = NULL;
    for (int lr = 0; lr < o->nproc; lr++) {
        child *c = &L->kids[L->first_trainer + lr];
        int rank = r->node_rank * o->nproc + lr;
        char v[20][PATH_MAX + 48];
        int n = 0;
#define ENV(...) (snprintf(v[n], sizeof(v[0]), __VA_ARGS__) < (int)sizeof(v[0]) ? n++ : n)
        ENV("LOCAL_RANK=%d", lr);
        ENV("RANK=%d", rank);
        ENV("GROUP_RANK=%d", r->node_rank);
        ENV("ROLE_RANK=%d", rank);
        ENV("ROLE_NAME=%s", o->role);
        ENV("LOCAL_WORLD_SIZE=%d", o->nproc);
        ENV("WORLD_SIZE=%d", world);
        ENV("GROUP_WORLD_SIZE=%d", r->nnodes);
        ENV("ROLE_WORLD_SIZE=%d", world);
        ENV("MASTER_ADDR=%s", r->master_addr);
        ENV("MASTER_PORT=%d", r->master_port);
        ENV("TORCHELASTIC_RESTART_COUNT=%d", L->attempt);
        ENV("TORCHELASTIC_MAX_RESTARTS=%d", o->max_restarts);
        ENV("TORCHELASTIC_RUN_ID=%s", o->rdzv_id);
        ENV("TORCHELASTIC_USE_AGENT_STORE=False");
        ENV("TORCH_NCCL_ASYNC_ERROR_HANDLING=%s",
            getenv("TORCH_NCCL_ASYNC_ERROR_HANDLING") ? getenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
                                                      : "1");
        if (!getenv("OMP_NUM_THREADS") && o->nproc > 1)
            ENV("OMP_NUM_THREADS=1");
        if (L->dir[0])
            ENV("RLB_SOCKET_DIR=%s", L->dir);
        if (L->log_root[0])
            ENV("TORCHELASTIC_ERROR_FILE=%s/attempt_%d/%d/error.json", L->log_root,
                L->attempt, lr);
#undef ENV
        char *set[20];
        for (int i = 0; i < n; i++)
            set[i] = v[i];
        int redirect = rlb__launch_std_bits(o->redirects, lr), tee = rlb__launch_std_bits(o->tee, lr);
        int shown = rlb__launch_rank_shown(o->local_ranks_filter, lr);
        for (int s = 0; s < 2; s++) {
            int bit = 1 << s;
            c->console[s] = shown && !(redirect & bit);
            c->file[s] = L->log_root[0] && ((redirect | tee) & bit)
                             ? open_log(L, lr, s ? "stderr.log" : "stdout.log")
                             : -1;
        }
        char **env = env_over(set, n);
        int rc = env ? spawn(L, c, argv, env) : -1;
        free(env);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* The exit status a wait status stands for: its code, or 128 + its signal. */
static int exit_code(int status)
{
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ---- the job across nodes -------------------------------------------------------------- */

/* The job-wide restart count in the store (0 while no node asked for a restart). */
static int store_attempt(launcher *L, int *attempt)
{
    int64_t v = 0;
    int rc = rlb__store_add(L->rdzv.store, "attempt", 0, &v);
    *attempt = (int)v;
    return rc;
}

/* Asks every node to restart its group: the first node to fail in an attempt moves the
 * job to the next one; the others' failures in the same attempt count once. */
static int ask_restart(launcher *L)
{
    char key[32];
    int64_t first = 0, v;
    snprintf(key, sizeof(key), "fail/%d", L->attempt);
    int rc = rlb__store_add(L->rdzv.store, key, 1, &first);
    if (rc == 0 && first == 1)
        rc = rlb__store_add(L->rdzv.store, "attempt", 1, &v);
    return rc;
}

static void announce_abort(launcher *L, const char *why)
{
    char line[256];
    int n = snprintf(line, sizeof(line), "node %d: %s", L->rdzv.node_rank, why);
    if (L->rdzv.store)
        rlb__store_set(L->rdzv.store, "abort", line, (size_t)n);
}

/* Runs trainer groups until one finishes, restarts run out, a signal, or another node
 * aborts. Returns the exit status. */
static int supervise(launcher *L)
{
    const rlb_launch_opts *o = &L->o;
    char why[256];
    int monitor_ms = (int)(o->monitor_interval * 1000);
    if (monitor_ms < 20)
        monitor_ms = 20;
    for (;;) {
        if (start_trainers(L) < 0) {
            announce_abort(L, "could not start the trainer processes");
            return 1;
        }
        int failed = -1, code = 0, done = 0;
        long long next_check = 0;
        while (!interrupted) {
            serve_io(L, monitor_ms);
            int died;
            while ((died = reap(L)) >= 0) {
                child *c = &L->kids[died];
                if (c->kind != KIND_TRAINER) {
                    snprintf(why, sizeof(why), "%s exited with status %d", c->prefix,
                             exit_code(c->status));
                    fprintf(stderr, "rlb launch: node %d: %s; stopping the job\n",
                            L->rdzv.node_rank, why);
                    announce_abort(L, why);
                    return 1;
                }
                int e = exit_code(c->status);
                if (e && failed < 0) {
                    failed = died;
                    code = e;
                }
            }
            int running = 0;
            for (int i = L->first_trainer; i < L->n_kids; i++)
                running += L->kids[i].pid > 0;
            if (failed >= 0 || !running)
                break;
            if (rlb__clock_ms() < next_check)
                continue;
            next_check = rlb__clock_ms() + (monitor_ms > 100 ? monitor_ms : 100);
            int attempt;
            size_t len = 0;
            if (rlb__store_get(L->rdzv.store, "abort", why, sizeof(why) - 1, &len) == 0) {
                why[len] = 0;
                fprintf(stderr, "rlb launch: node %d: stopping: %s\n", L->rdzv.node_rank, why);
                return 1;
            }
            if (store_attempt(L, &attempt) < 0) {
                fprintf(stderr, "rlb launch: node %d: lost the rendezvous store at %s:%d "
                        "(node 0's launcher is gone); stopping\n", L->rdzv.node_rank,
                        L->rdzv.store_addr, L->rdzv.store_port);
                return 1;
            }
            if (attempt > L->attempt) {
                done = 2; /* another node's group failed: restart ours with it */
                break;
            }
        }
        if (interrupted)
            return 128 + interrupted;
        if (failed < 0 && !done) {
            stop_kind(L, KIND_TRAINER, SIGTERM, GRACE_MS); /* drain their last output */
            return 0;
        }
        int worst = code;
        if (failed >= 0)
            fprintf(stderr, "rlb launch: node %d: %s (pid %d) exited with status %d; stopping "
                    "the trainer group\n", L->rdzv.node_rank, L->kids[failed].prefix,
                    (int)L->kids[failed].pid, code);
        stop_kind(L, KIND_TRAINER, SIGTERM, GRACE_MS);
        for (int i = L->first_trainer; i < L->n_kids; i++) {
            int e = i == failed ? code : 0;
            if (i != failed && WIFEXITED(L->kids[i].status) && WEXITSTATUS(L->kids[i].status))
                e = WEXITSTATUS(L->kids[i].status);
            worst = e > worst ? e : worst;
        }
        if (L->attempt >= o->max_restarts) {
            snprintf(why, sizeof(why), "trainer group failed (status %d) after %d restart(s)",
                     worst, L->attempt);
            announce_abort(L, why);
            return worst ? worst : 1;
        }
        if (failed >= 0 && ask_restart(L) < 0) {
            fprintf(stderr, "rlb launch: node %d: lost the rendezvous store; stopping\n",
                    L->rdzv.node_rank);
            return worst;
        }
        L->attempt++;
        fprintf(stderr, "rlb launch: node %d: restarting the trainer group (restart %d of %d); "
                "the bridge and workers stay up\n", L->rdzv.node_rank, L->attempt,
                o->max_restarts);
        for (int i = L->first_trainer; i < L->n_kids; i++)
            L->kids[i].status = 0;
    }
}

/* Node 0 keeps the store up until every node's group finished, so no node mistakes the
 * store's going away for a failure. */
static void wait_all_done(launcher *L)
{
    int64_t done = 0;
    if (rlb__store_add(L->rdzv.store, "done", 1, &done) < 0 || L->rdzv.node_rank != 0)
        return;
    char why[256];
    size_t len;
    /* bounded by the other nodes: each says done, or abort (its watchdog does if it died) */
    while (!interrupted && done < L->rdzv.nnodes) {
        if (rlb__store_get(L->rdzv.store, "abort", why, sizeof(why), &len) == 0)
            return;
        sleep_ms(50);
        if (rlb__store_add(L->rdzv.store, "done", 0, &done) < 0)
            return;
    }
}

/* Whether the script can run; NULL when it can, else the reason. */
static const char *check_script(const rlb_launch_opts *o, char *buf, size_t cap)
{
    const char *s = o->script_argv[0];
    if (o->module)
        return NULL; /* python resolves modules; its error shows in the trainer's output */
    if (o->no_python && !strchr(s, '/')) {
        const char *path = getenv("PATH");
        char dir[PATH_MAX], full[PATH_MAX];
        while (path && *path) {
            size_t n = strcspn(path, ":");
            snprintf(dir, sizeof(dir), "%.*s", (int)n, path);
            if (snprintf(full, sizeof(full), "%s/%s", dir, s) < (int)sizeof(full) &&
                access(full, X_OK) == 0)
                return NULL;
            path += n + (path[n] == ':');
        }
        snprintf(buf, cap, "program '%s' is not in PATH", s);
        return buf;
    }
    if (access(s, o->no_python ? X_OK : R_OK) != 0) {
        snprintf(buf, cap, "script '%s' %s", s, errno == ENOENT ? "does not exist"
                                                                : strerror(errno));
        return buf;
    }
    return NULL;
}

/* --local-addr: the interface of this machine that holds the address (a name is resolved)
 * into L->ifname: the one it is assigned to, else the loopback interface whose network
 * holds it (127.0.0.2 is on lo); an address is this machine's when a socket can bind it.
 * Returns NULL, or what is wrong in buf (this node's bad input, which the rendezvous
 * reports to every node). */
static const char *check_local_addr(launcher *L, char *buf, size_t cap)
{
    const char *a = L->o.local_addr;
    struct sockaddr_in want;
    struct ifaddrs *ifs = NULL;
    if (!a)
        return NULL;
    if (rlb__store_resolve(a, 0, &want) != 0) {
        snprintf(buf, cap, "--local-addr %s is not an IPv4 address or a name that resolves "
                 "to one", a);
        return buf;
    }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int bound = fd >= 0 && bind(fd, (const struct sockaddr *)&want, sizeof(want)) == 0;
    if (fd >= 0)
        close(fd);
    if (getifaddrs(&ifs) != 0) {
        snprintf(buf, cap, "--local-addr %s: cannot list this machine's interfaces: %s", a,
                 strerror(errno));
        return buf;
    }
    size_t at = 0;
    char have[256] = "", loop[64] = "";
    for (struct ifaddrs *i = ifs; i; i = i->ifa_next) {
        if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET)
            continue;
        const struct sockaddr_in *sa = (const struct sockaddr_in *)i->ifa_addr;
        const struct sockaddr_in *mask = (const struct sockaddr_in *)i->ifa_netmask;
        if (sa->sin_addr.s_addr == want.sin_addr.s_addr) {
            snprintf(L->ifname, sizeof(L->ifname), "%s", i->ifa_name);
            L->loopback = (i->ifa_flags & IFF_LOOPBACK) != 0;
            break;
        }
        if ((i->ifa_flags & IFF_LOOPBACK) && mask &&
            (sa->sin_addr.s_addr & mask->sin_addr.s_addr) ==
                (want.sin_addr.s_addr & mask->sin_addr.s_addr))
            snprintf(loop, sizeof(loop), "%s", i->ifa_name);
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &sa->sin_addr, ip, sizeof(ip));
        int w = snprintf(have + at, sizeof(have) - at, "%s%s %s", at ? ", " : "", i->ifa_name,
                         ip);
        at = w < 0 || (size_t)w >= sizeof(have) - at ? sizeof(have) - 1 : at + (size_t)w;
    }
    freeifaddrs(ifs);
    if (!L->ifname[0] && bound && loop[0]) {
        snprintf(L->ifname, sizeof(L->ifname), "%s", loop);
        L->loopback = 1;
    }
    if (L->ifname[0] && bound)
        return NULL;
    L->ifname[0] = 0;
    snprintf(buf, cap, "--local-addr %s is not an address of this machine (its IPv4 "
             "interfaces: %s)", a, have[0] ? have : "none");
    return buf;
}

static int setup(launcher *L)
{
    const rlb_launch_opts *o = &L->o;
    int workers = o->rollout_replicas * o->rollout_tp;
    L->first_trainer = o->rollout_replicas ? 1 + workers : 0;
    L->n_kids = L->first_trainer + o->nproc;
    L->kids = calloc((size_t)L->n_kids, sizeof(*L->kids));
    if (!L->kids)
        return -1;
    for (int i = 0; i < L->n_kids; i++) {
        child *c = &L->kids[i];
        c->fd[0] = c->fd[1] = c->file[0] = c->file[1] = -1;
        c->console[0] = c->console[1] = 1;
        if (i >= L->first_trainer) {
            c->kind = KIND_TRAINER;
            c->local_rank = i - L->first_trainer;
            snprintf(c->prefix, sizeof(c->prefix), "[trainer %d]",
                     L->rdzv.node_rank * o->nproc + c->local_rank);
        } else if (i == 0) {
            c->kind = KIND_BRIDGE;
            snprintf(c->prefix, sizeof(c->prefix), "[bridge]");
        } else {
            c->kind = KIND_WORKER;
            snprintf(c->prefix, sizeof(c->prefix), "[worker %d.%d]", (i - 1) / o->rollout_tp,
                     (i - 1) % o->rollout_tp);
        }
    }
    if (o->rollout_replicas) {
        /* named by our pid, so whoever looks at /tmp (a test, an operator) can tell whose
         * it is while other jobs of the machine have theirs there */
        snprintf(L->dir, sizeof(L->dir), "/tmp/rlb-launch-%d-XXXXXX", (int)getpid());
        if (!mkdtemp(L->dir)) {
            perror("rlb launch: mkdtemp");
            L->dir[0] = 0;
            return -1;
        }
        watchdog_say(L, "dir %s\n", L->dir);
        snprintf(L->socket, sizeof(L->socket), "%s/bridge", L->dir);
    }
    int redirected = (o->redirects && strcmp(o->redirects, "0")) || (o->tee && strcmp(o->tee, "0"));
    if (o->log_dir || redirected) {
        char base[PATH_MAX];
        if (o->log_dir) {
            snprintf(base, sizeof(base), "%s", o->log_dir);
            mkdir(base, 0755);
        } else {
            strcpy(base, "/tmp/rlb-launch-logs-XXXXXX");
            if (!mkdtemp(base)) {
                perror("rlb launch: mkdtemp");
                return -1;
            }
        }
        if (snprintf(L->log_root, sizeof(L->log_root), "%s/%s", base, o->rdzv_id) >=
                (int)sizeof(L->log_root) ||
            (mkdir(L->log_root, 0755) < 0 && errno != EEXIST)) {
            fprintf(stderr, "rlb launch: cannot create %s: %s\n", L->log_root, strerror(errno));
            L->log_root[0] = 0;
            return -1;
        }
        if (!o->log_dir)
            fprintf(stderr, "rlb launch: logs in %s\n", L->log_root);
    }
    return 0;
}

int rlb__cmd_launch(int argc, char **argv)
{
    launcher *L = calloc(1, sizeof(*L));
    if (!L)
        return 1;
    L->watchdog = L->signal_pipe[0] = L->signal_pipe[1] = -1;
    int rc = rlb__launch_parse(argc, argv, &L->o);
    if (rc) {
        free(L);
        return rc == 1 ? 0 : rc;
    }
    const rlb_launch_opts *o = &L->o;
    char script_buf[PATH_MAX + 64], err[512];
    char addr_buf[512];
    const char *script_error = check_script(o, script_buf, sizeof(script_buf));
    if (!script_error) /* the node's first bad input goes to the rendezvous */
        script_error = check_local_addr(L, addr_buf, sizeof(addr_buf));
    ssize_t n = readlink("/proc/self/exe", L->self, sizeof(L->self) - 1);
    if (n <= 0) {
        perror("rlb launch: /proc/self/exe");
        free(L);
        return 1;
    }
    L->self[n] = 0;
    /* the watchdog first: a fork before the store's thread exists */
    L->watchdog = watchdog_start();
    if (L->watchdog < 0 || pipe2(L->signal_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        perror("rlb launch: watchdog");
        free(L);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    /* during the rendezvous a signal's default action is right: nothing is started yet */
    rc = rlb__rdzv_join(o, script_error, &L->rdzv, err, sizeof(err));
    if (rc < 0) {
        fprintf(stderr, "rlb launch: %s\n", err);
        rc = 1;
        goto out;
    }
    watchdog_say(L, "store %d %s %d %s\n", L->rdzv.node_rank, L->rdzv.store_addr,
                 L->rdzv.store_port, o->rdzv_id);
    signal_wfd = L->signal_pipe[1];
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGQUIT, &sa, NULL);
    if (o->nproc > 1 && !getenv("OMP_NUM_THREADS"))
        fprintf(stderr, "rlb launch: setting OMP_NUM_THREADS to 1 for each process (torchrun's "
                        "default); tune it for your application\n");
    if (setup(L) < 0) {
        rc = 1;
        goto out;
    }
    if (L->ifname[0])
        fprintf(stderr, "rlb launch: node %d: --local-addr %s is on interface %s: the bridges' "
                "transports use it (UCX_NET_DEVICES=%s, NCCL_SOCKET_IFNAME=%s)%s\n",
                L->rdzv.node_rank, o->local_addr, L->ifname,
                getenv("UCX_NET_DEVICES") ? getenv("UCX_NET_DEVICES") : L->ifname,
                getenv("NCCL_SOCKET_IFNAME") ? getenv("NCCL_SOCKET_IFNAME") : L->ifname,
                L->loopback && L->rdzv.nnodes > 1
                    ? "; it is a loopback interface, which other machines cannot reach: "
                      "right only when every node runs on this machine"
                    : "");
    if (o->rollout_replicas && start_rollout(L) < 0) {
        announce_abort(L, "its bridge and workers did not start");
        rc = interrupted ? 128 + interrupted : 1;
        goto out;
    }
    rc = supervise(L);
    if (interrupted) {
        fprintf(stderr, "rlb launch: node %d: interrupted by signal %d; stopping everything\n",
                L->rdzv.node_rank, (int)interrupted);
        for (int i = L->first_trainer; i < L->n_kids; i++)
            if (L->kids[i].pid > 0)
                kill(-L->kids[i].pid, interrupted); /* forwarded as torchrun does */
        announce_abort(L, "interrupted");
    } else if (rc == 0) {
        wait_all_done(L);
    }
out:
    if (L->kids) {
        stop_kind(L, KIND_TRAINER, SIGTERM, GRACE_MS);
        stop_kind(L, KIND_WORKER, SIGTERM, GRACE_MS);
        stop_kind(L, KIND_BRIDGE, SIGTERM, GRACE_MS);
    }
    if (L->dir[0])
        remove_dir(L->dir); /* only the socket is there, if the bridge could not remove it */
    rlb__rdzv_leave(&L->rdzv);
    watchdog_say(L, "done\n");
    close(L->watchdog);
    close(L->signal_pipe[0]);
    close(L->signal_pipe[1]);
    free(L->kids);
    free(L);
    return rc;
}
