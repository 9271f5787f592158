/* cmd_stress.c: `rlb stress`, DESIGN §11: every process of a node for real, at full load,
 * under a seeded schedule of faults, checked continuously.
 *
 * Processes (children of this one, which re-executes itself for the roles): a bridge
 * (`rlb bridge --tiny`), replicas x tp workers (`rlb worker --tiny`), trainer ranks
 * (launch/stress_trainer.c: shards mixing FSDP1 and FSDP2 units, a mix drawn anew for each
 * bridge), generating clients (launch/stress_client.c) and the checker
 * (launch/stress_checker.c), on the CPU backend. Trainers publish one version after another
 * with weights that are a pure function of (seed, version); clients send random requests
 * and put the workers to sleep now and then; the checker probes every commit.
 *
 * Faults (launch/stress_sched.c draws their moments from the seed): kill -9 of the bridge
 * (restarted; trainers, workers, clients and checker come back to it), of a worker (its
 * replica is restarted once its other ranks are gone, and heals), of a trainer rank or a
 * client (restarted; a trainer rank killed on a version it had not published yet leaves the
 * other ranks waiting for it at the bridge, so its successor publishes that version too, as
 * a restarted rank of a real job resumes its step), SIGSTOP of a worker past
 * RLB_PEER_TIMEOUT_MS then SIGCONT or kill -9, poisoned versions (one NaN: the version must
 * abort with RLB_ENONFINITE), a hostile client (forked from here) committing garbage
 * records, cut messages or lying record headers, or leaving mid-message, and segments
 * truncated under the bridge (truncate_seg: kill -9 of a trainer rank whose next
 * incarnation, launch/stress_trainer.c, either passes its shards in an unsealed memfd and
 * truncates it to 0 bytes, or tries to truncate its sealed rlb_alloc_host segment once the
 * bridge mapped it). The bridge must refuse the unsealed segment at the register with
 * RLB_EPERM naming the missing seals, the rank's version must abort, and the bridge must
 * neither die (SIGBUS counts as crashed) nor stop serving the others; the sealed
 * truncation must fail with EPERM.
 *
 * Progress and its bounds. Faults start once the system is up: the bridge, every replica,
 * the trainer ranks and a first committed version (startup, within STARTUP_MS, nothing
 * injected meanwhile). From then on the schedule takes processes out on purpose, and while
 * they are out no progress is possible, by design:
 *   - after a kill of the bridge no request can succeed (RLB_ENOTREADY) until the new bridge
 *     commits, which needs every replica formed (a bridge that never served waits for all)
 *     and every trainer rank registered; a kill or stop of a worker or a trainer rank
 *     meanwhile starts its part over, and so does another kill of the bridge;
 *   - no version commits while a trainer rank is restarting, and in pause mode a version
 *     aborted after its copy began leaves the workers stale (RLB_ESTALE) until one does;
 *   - a stopped worker holds a drain or a load until RLB_PEER_TIMEOUT_MS declares it dead.
 * The kinds that take a process out arrive about 29 times a minute (Poisson), so a stretch
 * without one, long enough for the restarts to finish, can be any length, and how long a
 * restart takes is the machine's load, not a bound of ours: on a loaded machine half a
 * minute without progress is what the schedule makes, not a stuck protocol. The two are
 * told apart by running the stall clock only while progress is possible, and bounding the
 * time a process is out apart:
 *   stall     STALL_MS without a commit or an answered request, counted only while the
 *             bridge listens and a commit can come (every trainer rank registered and a
 *             worker running; every worker, before this bridge's first commit) or an answer
 *             can (a worker running, this bridge committed, and in pause mode no abort since
 *             its last commit): the protocol had what it needs and did nothing;
 *   recovery  a bridge, worker or trainer rank not up (listening; running and not stopped;
 *             registered) RECOVERY_MS after it went down and after the last fault that hit
 *             it or its bridge. RECOVERY_MS is derived from the run's own bounds: as long as
 *             startup may take (STARTUP_MS: the same processes start again) plus the longest
 *             chain of timeouts a fault sets off before a process can start again: a worker
 *             stopped for up to STOP_MAX_MS, then dropped by the bridge, its TP ranks that do
 *             not leave by themselves killed after GRACE_MS (a trainer rank's chain, 100 ms
 *             to restart, its 3 s connect bound and a register held RLB_PEER_TIMEOUT_MS for
 *             its segment, is shorter).
 * A stall, recovery or startup violation prints what was pending then: the round in flight
 * and the bridge's sync phase, requests in flight and their age, what is stopped or
 * restarting, the faults since the last progress, the load average and CPU pressure, and
 * each process's CPU time against its time waiting for a CPU since the last progress
 * (starvation shows as waiting; a stuck protocol as processes asleep).
 *
 * Invariants, each counted as violations:
 *   startup     the bridge, every replica and a first committed version not up within
 *               STARTUP_MS of the start
 *   hung        a call past its deadline (request, probe, publish) without an answer
 *   stall       no commit and no answered request for STALL_MS while progress is possible
 *   recovery    a process not up again within RECOVERY_MS (see above)
 *   unnamed     a failure without an RLB_E* code and a sentence
 *   bad_shape   a result whose samples are missing, repeated, out of order, too long, or
 *               whose finish reason contradicts its tokens
 *   not_refused an invalid request that was served; an unsealed segment the bridge took (its
 *               register succeeded, or a version holding it committed); a sealed segment
 *               its owner could truncate
 *   lost        a request of a client that stopped cleanly and never got its answer
 *   torn        a probe whose worker computed with other weights than the version stamped
 *   uncommitted a result stamped with a version that aborted or was never published
 *   split       ranks of one version told different outcomes (synced and aborted)
 *   poison      a poisoned version committed
 *   checksum    a trainer published bytes other than the version's (FNV-1a mismatch)
 *   crashed     a process died of a signal we did not send, or the bridge exited non-zero
 *   leftovers   after the run: rlbridge's segments of this run in /dev/shm, entries in the
 *               socket directory, zombies or processes still running, fds of this process
 *               or of the bridge that grew
 * A failing run prints its seed; `--seed` replays the same schedule.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bridge/bridge.h"
#include "common/cli_args.h"
#include "common/shm.h"
#include "launch/cmds.h"
#include "launch/stress.h"

#define MAX_WORKERS 16
#define MAX_TRAINERS 8
#define MAX_CLIENTS 8
#define MAX_HOSTILE 16
#define PEER_TIMEOUT_MS 1500   /* RLB_PEER_TIMEOUT_MS of the run */
#define HEARTBEAT_MS 100       /* RLB_HEARTBEAT_MS of the run */
#define PUBLISH_BOUND_MS 45000 /* a trainer answers a publish within this (its own 30 s) */
#define GRACE_MS 5000          /* ranks of a broken replica exit by themselves within this */
#define STOP_GRACE_MS 40000    /* clients finish their batch within this after SIGTERM */
#define FAULT_PATIENCE_MS 5000 /* a fault that cannot apply now waits this long at most */
#define STOP_MIN_MS (PEER_TIMEOUT_MS + 300)  /* a SIGSTOP of the schedule lasts at least */
#define STOP_MAX_MS (PEER_TIMEOUT_MS + 1500) /* ... and less than this */
#define STARTUP_MS 60000       /* bridge, replicas, trainer ranks and a first commit up */
#define STALL_MS 30000         /* while every process is up: a commit or an answer this often */
#define RECOVERY_MS (STARTUP_MS + STOP_MAX_MS + GRACE_MS) /* a process a fault took out is
                                                            up again (file comment) */
#define MAX_SENT 8             /* a client's requests in flight the report keeps ages of */
#define RECENT_FAULTS 16       /* faults the report keeps */

enum { P_BRIDGE, P_WORKER, P_TRAINER, P_CLIENT, P_CHECKER, P_HOSTILE };
static const char *const kind_names[] = {"bridge", "worker", "trainer", "client", "checker",
                                         "hostile"};

/* A process's CPU times (/proc/PID/schedstat): running, and runnable but waiting for a CPU. */
typedef struct cpu_mark {
    pid_t pid;        /* whose (0: none taken) */
    uint64_t run_ns;  /* on a CPU */
    uint64_t wait_ns; /* runnable, waiting for one */
} cpu_mark;

typedef struct proc {
    pid_t pid;          /* 0: not running */
    int kind;           /* P_* */
    int idx;            /* index among its kind */
    int cmd_fd;         /* write end of its command pipe, or -1 */
    int rec_fd;         /* read end of its record pipe, or -1 */
    int killed;         /* we sent it SIGKILL or SIGTERM */
    int stopped;        /* SIGSTOP sent, not yet resumed */
    int64_t resume_at;  /* when to resume (or kill) it */
    int resume_kill;    /* kill -9 instead of SIGCONT */
    int ready;          /* trainer: registered */
    int busy;           /* trainer: a publish in flight */
    int64_t busy_since; /* trainer: when */
    int64_t outstanding; /* client: submitted, not yet answered */
    uint32_t fault;     /* hostile: the fault kind it injects */
    uint32_t truncate;  /* trainer: the rlb_stress_truncate its incarnations run until one
                           says READY (truncate_seg) */
    rlb_stress_cmd cmd; /* trainer: the last command it was sent */
    rlb_stress_cmd owed; /* trainer: the command its predecessor died on unanswered (version
                            0: none), which it carries out if the round is still open */
    int rejoined;       /* trainer: busy with its predecessor's command */
    int64_t died_at;    /* when it was last reaped */
    int64_t down_since; /* bridge, worker, trainer: when it last stopped being up, 0 while
                           up (proc_up) */
    int64_t hit_at;     /* when a fault last took it out */
    int64_t sent_at[MAX_SENT]; /* client: when its oldest requests in flight went out */
    cpu_mark mark;      /* its CPU times when the window without progress began */
} proc;

enum { V_NONE, V_PUBLISHING, V_COMMITTED, V_ABORTED, V_UNKNOWN };

typedef struct vinfo {
    uint8_t state;    /* V_* */
    uint8_t poisoned; /* carried a NaN */
    uint8_t ok, aborted; /* answers seen: synced / aborted */
    uint8_t nonfinite; /* an abort named non-finite values as its cause */
    uint8_t unsealed; /* a rank's shards lay in an unsealed segment (truncate_seg) */
    uint32_t served;  /* samples stamped with it */
} vinfo;

enum {
    X_STARTUP, X_HUNG, X_STALL, X_RECOVERY, X_UNNAMED, X_BAD_SHAPE, X_NOT_REFUSED, X_LOST,
    X_TORN, X_UNCOMMITTED, X_SPLIT, X_POISON, X_CHECKSUM, X_CRASHED, X_LEFTOVERS, X_COUNT
};
static const char *const violation_names[X_COUNT] = {
    "startup", "hung", "stall", "recovery", "unnamed", "bad_shape", "not_refused", "lost",
    "torn", "uncommitted", "split", "poison", "checksum", "crashed", "leftovers"};

/* A fault as it was applied. */
typedef struct fault_note {
    int64_t at;     /* when */
    uint32_t kind;  /* rlb_stress_fault */
    int target;     /* index of the process it hit among its kind, -1: none */
} fault_note;

typedef struct opts {
    int duration_s;
    uint64_t seed;
    uint32_t trainers, replicas, tp, clients;
    const char *mode;
    uint32_t faults;
    int json;
} opts;

typedef struct stress {
    opts o;
    char self[PATH_MAX];
    char dir[64];     /* socket directory */
    char logdir[64];  /* daemon logs */
    char sock[128];
    proc bridge, workers[MAX_WORKERS], trainers[MAX_TRAINERS], clients[MAX_CLIENTS], checker;
    proc hostile[MAX_HOSTILE];
    int bridge_up;            /* its socket accepts connections */
    int draining;             /* stopping: the clients finish, nothing restarts them */
    uint32_t incarnation;     /* bridges started */
    uint32_t units;           /* FSDP1 units of this bridge's trainers */
    int64_t start;            /* start of the run */
    int64_t t0;               /* start of the faults: the system is up (0 before) */
    int64_t last_progress;    /* last commit or answered request */
    int64_t quiet_ms;         /* of the time since, how long progress was possible */
    int64_t last_watch;       /* when the watchdogs last ran */
    int64_t orphaned_at;      /* since when only ranks carrying out their predecessor's
                                 command wait on the round (0: none) */
    int64_t max_gap, max_quiet; /* the longest window without progress since the faults
                                   began, and the most of one with progress possible */
    uint64_t bridge_commits;  /* versions this bridge committed */
    int last_aborted;         /* the last version settled did not commit */
    int64_t marks_at;         /* when the processes' cpu_marks were taken */
    cpu_mark self_mark;       /* ... and this process's */
    uint64_t last_committed;  /* the last version committed, and when */
    int64_t last_commit_at;
    /* versions */
    vinfo *v;                 /* [v_cap] by version */
    uint64_t v_cap, next_version;
    uint64_t round;           /* version in flight, 0 = none */
    int64_t next_publish_at;
    uint32_t pending_poison;  /* poison faults waiting for the next round */
    uint64_t poison_pick;     /* element the next poison hits */
    /* faults */
    rlb_stress_event *ev;
    int n_ev, next_ev;
    uint64_t injected[RLB_FAULT_COUNT_], skipped[RLB_FAULT_COUNT_];
    fault_note recent[RECENT_FAULTS]; /* the last faults applied, a ring */
    uint64_t n_recent;
    /* outcomes */
    uint64_t publish_rc[RLB_E_COUNT_], answer_rc[RLB_E_COUNT_], probe_rc[RLB_E_COUNT_];
    uint64_t probe_verdict[3], sleeps, submitted, answered, samples, connects;
    uint64_t restarts[P_HOSTILE + 1], committed, aborted, unknown, served_unknown;
    uint64_t forced_kills;
    uint64_t rejoins;         /* trainer ranks that published their predecessor's version */
    uint64_t poison_aborted, poison_named; /* poisoned versions aborted; naming the NaN */
    uint64_t x[X_COUNT];
    char first_violation[320];
    int fd_self0, fd_bridge0;
    char *shm_before[256];
    int n_shm_before;
} stress;

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
    interrupted = sig;
}

static const char *code_name(int rc)
{
    static const char *const names[] = {
        "ok", "EINVAL", "ENOMEM", "EIO", "ETIMEDOUT", "EPEERDEAD", "EAGAIN", "EPROTO",
        "EVERSION", "EPERM", "ENOTFOUND", "EEXIST", "ETOOBIG", "ESHAPE", "EDTYPE",
        "EUNSUPPORTED", "ESTALE", "EABORTED", "ECUDA", "ESHUTDOWN", "ECORRUPT", "ENONFINITE",
        "ENOREPLICA", "ENOTREADY"};
    _Static_assert(sizeof(names) / sizeof(names[0]) == RLB_E_COUNT_, "one name per code");
    return rc <= 0 && rc > -RLB_E_COUNT_ ? names[-rc] : "unknown";
}

static int code_index(int rc)
{
    return rc <= 0 && rc > -RLB_E_COUNT_ ? -rc : 0;
}

/* Seconds from the start of the faults (of the run, during startup) to monotonic ms t. */
static double run_s(const stress *s, int64_t t)
{
    return (t - (s->t0 ? s->t0 : s->start)) / 1000.0;
}

static void violation(stress *s, int kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void violation(stress *s, int kind, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    s->x[kind]++;
    if (!s->first_violation[0])
        snprintf(s->first_violation, sizeof(s->first_violation), "%s: %s",
                 violation_names[kind], msg);
    fprintf(stderr, "rlb stress: VIOLATION %s at %.1f s: %s\n", violation_names[kind],
            run_s(s, rlb__clock_ms()), msg);
}

static int count_fds(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        n += e->d_name[0] != '.';
    if (d)
        closedir(d);
    return n - (pid == getpid()); /* our own opendir's fd */
}

/* State letter (R running, S asleep, T stopped, Z zombie, ...) and parent of process pid
 * (/proc/PID/stat). Returns 0 or -1 when it is gone. */
static int proc_stat(const char *pid, char *state, int *ppid)
{
    char path[300], line[512];
    snprintf(path, sizeof(path), "/proc/%s/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    *state = '?';
    *ppid = 0;
    if (fgets(line, sizeof(line), f)) {
        char *close_paren = strrchr(line, ')');
        if (close_paren)
            sscanf(close_paren + 1, " %c %d", state, ppid);
    }
    fclose(f);
    return 0;
}

/* ---- Processes ------------------------------------------------------------------------ */

static void close_pipes(proc *p)
{
    if (p->cmd_fd >= 0)
        close(p->cmd_fd);
    if (p->rec_fd >= 0)
        close(p->rec_fd);
    p->cmd_fd = p->rec_fd = -1;
}

/* Starts argv as child p with a command pipe on fd 3 and a record pipe on fd 4 (roles), its
 * output appended to the kind's log. Returns 0 or -1. */
static int spawn(stress *s, proc *p, char *const argv[], int pipes)
{
    int cmd[2] = {-1, -1}, rec[2] = {-1, -1};
    if (pipes && (pipe2(cmd, O_CLOEXEC) || pipe2(rec, O_CLOEXEC)))
        return -1;
    char log[160];
    snprintf(log, sizeof(log), "%s/%s%d.log", s->logdir, kind_names[p->kind], p->idx);
    pid_t parent = getpid();
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
        if (fd < 0 || dup2(fd, STDOUT_FILENO) < 0 || dup2(fd, STDERR_FILENO) < 0)
            _exit(1);
        /* Out of the way first: a pipe end may already sit on fd 3 or 4. */
        int in = pipes ? fcntl(cmd[0], F_DUPFD_CLOEXEC, 10) : -1;
        int out = pipes ? fcntl(rec[1], F_DUPFD_CLOEXEC, 10) : -1;
        if (pipes && (in < 0 || out < 0 || dup2(in, RLB_STRESS_CMD_FD) < 0 ||
                      dup2(out, RLB_STRESS_REC_FD) < 0))
            _exit(1);
        /* A role starts with SIGTERM blocked and unblocks it once its handler is in place
         * (rlb__stress_role_parse): the stop's SIGTERM to a role started moments before
         * then asks it to finish instead of killing it. */
        sigset_t term;
        sigemptyset(&term);
        sigaddset(&term, SIGTERM);
        if (pipes)
            sigprocmask(SIG_BLOCK, &term, NULL);
        execv(argv[0], argv);
        _exit(127);
    }
    if (pipes) {
        close(cmd[0]);
        close(rec[1]);
    }
    if (pid < 0) {
        if (pipes) {
            close(cmd[1]);
            close(rec[0]);
        }
        return -1;
    }
    *p = (proc){.pid = pid, .kind = p->kind, .idx = p->idx, .cmd_fd = pipes ? cmd[1] : -1,
                .rec_fd = pipes ? rec[0] : -1, .died_at = p->died_at, .fault = p->fault,
                .truncate = p->truncate, .down_since = p->down_since, .hit_at = p->hit_at,
                .owed = p->owed};
    if (pipes)
        fcntl(p->rec_fd, F_SETFL, O_NONBLOCK);
    return 0;
}

static void spawn_bridge(stress *s)
{
    char *argv[] = {s->self, "bridge", "--socket", s->sock, "--tiny", "--mode",
                    (char *)s->o.mode, "--threads", "1", NULL};
    s->incarnation++;
    /* Each bridge gets its own mix of FSDP1 and FSDP2 units (all its trainers agree). */
    uint32_t units_mask = (1u << (rlb__stress_params()->cfg.n_layers + 1)) - 1;
    s->units = (uint32_t)rlb__stress_key(s->o.seed, 0x756e697473ull, s->incarnation, 0) &
               units_mask;
    s->bridge_up = 0;
    s->bridge_commits = 0;
    if (spawn(s, &s->bridge, argv, 0) == 0)
        s->restarts[P_BRIDGE] += s->incarnation > 1;
}

static void spawn_worker(stress *s, int i)
{
    char rep[16], reps[16], tpr[16], tps[16];
    snprintf(rep, sizeof(rep), "%u", (uint32_t)i / s->o.tp);
    snprintf(reps, sizeof(reps), "%u", s->o.replicas);
    snprintf(tpr, sizeof(tpr), "%u", (uint32_t)i % s->o.tp);
    snprintf(tps, sizeof(tps), "%u", s->o.tp);
    char *argv[] = {s->self, "worker", "--bridge", s->sock, "--replica", rep, "--replicas",
                    reps, "--tp-rank", tpr, "--tp-size", tps, "--tiny", "--threads", "1",
                    "--kv-mb", "8", NULL};
    spawn(s, &s->workers[i], argv, 0);
}

static void spawn_role(stress *s, proc *p, const char *role)
{
    char seed[32], idx[16], world[16], units[16], reps[16];
    snprintf(seed, sizeof(seed), "%llu", (unsigned long long)s->o.seed);
    snprintf(idx, sizeof(idx), "%d", p->idx);
    snprintf(world, sizeof(world), "%u", s->o.trainers);
    snprintf(units, sizeof(units), "%u", s->units);
    snprintf(reps, sizeof(reps), "%u", s->o.replicas);
    char *argv[] = {s->self, "stress", "--role", (char *)role, "--socket", s->sock, "--seed",
                    seed, "--rank", idx, "--world", world, "--units", units,
                    p->truncate ? "--truncate" : NULL,
                    (char *)rlb__stress_truncate_name(p->truncate), NULL};
    char *client_argv[] = {s->self, "stress", "--role", (char *)role, "--socket", s->sock,
                           "--seed", seed, "--id", idx, NULL};
    char *checker_argv[] = {s->self, "stress", "--role", (char *)role, "--socket", s->sock,
                            "--seed", seed, "--replicas", reps, NULL};
    spawn(s, p, p->kind == P_TRAINER ? argv : p->kind == P_CLIENT ? client_argv : checker_argv,
          1);
}

static void kill_proc(proc *p, int sig)
{
    if (p->pid > 0) {
        p->killed = 1;
        kill(p->pid, sig);
        if (p->stopped && sig != SIGSTOP)
            kill(p->pid, SIGCONT);
    }
}

static int bridge_listening(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path))
        return 0;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    int ok = fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    if (fd >= 0)
        close(fd);
    return ok;
}

/* ---- Records ----------------------------------------------------------------------------- */

static vinfo *version(stress *s, uint64_t v)
{
    if (v >= s->v_cap) {
        uint64_t cap = s->v_cap ? s->v_cap : 1024;
        while (cap <= v)
            cap *= 2;
        vinfo *grown = realloc(s->v, cap * sizeof(*grown));
        if (!grown)
            abort();
        memset(grown + s->v_cap, 0, (cap - s->v_cap) * sizeof(*grown));
        s->v = grown;
        s->v_cap = cap;
    }
    return &s->v[v];
}

/* Notes the longest window without progress so far, the one open now included. */
static void note_gap(stress *s, int64_t now)
{
    if (s->t0 && now - s->last_progress > s->max_gap)
        s->max_gap = now - s->last_progress;
    if (s->quiet_ms > s->max_quiet)
        s->max_quiet = s->quiet_ms;
}

/* A commit or an answered request: the window without progress starts again. */
static void progress(stress *s)
{
    int64_t now = rlb__clock_ms();
    note_gap(s, now);
    s->last_progress = now;
    s->quiet_ms = 0;
}

/* The checksum rank r's bytes of version v must have. */
static uint64_t expected_checksum(stress *s, uint32_t rank, uint64_t v, int poisoned)
{
    static float *mem;
    static size_t cap;
    rlb_stress_shards sh;
    rlb__stress_shards_init(&sh, rank, s->o.trainers, s->units);
    if (sh.floats > cap) {
        free(mem);
        mem = malloc(sh.floats * sizeof(float));
        cap = sh.floats;
    }
    rlb__stress_shards_fill(&sh, s->o.seed, v, mem);
    if (poisoned)
        mem[rlb__stress_shards_pick(&sh, s->poison_pick)] = NAN;
    return rlb__stress_fnv(mem, sh.floats * sizeof(float));
}

static void served(stress *s, uint64_t vmin, uint64_t vmax, uint32_t n)
{
    if (vmin)
        version(s, vmin)->served += n;
    if (vmax != vmin)
        version(s, vmax)->served += n;
}

/* Closes the round once no participant is busy: decides the version's outcome. */
static void round_check(stress *s)
{
    if (!s->round)
        return;
    for (uint32_t r = 0; r < s->o.trainers; r++)
        if (s->trainers[r].busy)
            return;
    vinfo *vi = version(s, s->round);
    if (vi->ok && vi->aborted)
        violation(s, X_SPLIT, "version %llu: %u rank(s) synced, %u aborted",
                  (unsigned long long)s->round, vi->ok, vi->aborted);
    if (vi->ok && vi->poisoned)
        violation(s, X_POISON, "poisoned version %llu committed", (unsigned long long)s->round);
    if (vi->ok && vi->unsealed)
        violation(s, X_NOT_REFUSED, "version %llu committed, though a rank's shards lay in a "
                  "segment the bridge refused", (unsigned long long)s->round);
    vi->state = vi->ok ? V_COMMITTED : vi->aborted ? V_ABORTED : V_UNKNOWN;
    s->poison_aborted += vi->poisoned && vi->state == V_ABORTED;
    s->poison_named += vi->poisoned && vi->nonfinite;
    s->committed += vi->state == V_COMMITTED;
    s->aborted += vi->state == V_ABORTED;
    s->unknown += vi->state == V_UNKNOWN;
    s->last_aborted = vi->state != V_COMMITTED;
    s->bridge_commits += vi->state == V_COMMITTED;
    if (vi->state == V_COMMITTED) {
        progress(s);
        s->last_committed = s->round;
        s->last_commit_at = s->last_progress;
        rlb_stress_cmd cmd = {.version = s->round};
        if (s->checker.pid > 0 && s->checker.cmd_fd >= 0 &&
            write(s->checker.cmd_fd, &cmd, sizeof(cmd)) < 0)
            kill_proc(&s->checker, SIGKILL);
    }
    s->round = 0;
    s->next_publish_at = rlb__clock_ms() + 5;
}

/* Sends trainer t a publish command; a trainer that cannot take it is killed. */
static void command(proc *t, rlb_stress_cmd cmd)
{
    t->cmd = cmd;
    t->busy = 1;
    t->busy_since = rlb__clock_ms();
    t->rejoined = 0;
    if (write(t->cmd_fd, &cmd, sizeof(cmd)) != (ssize_t)sizeof(cmd)) {
        t->busy = 0;
        kill_proc(t, SIGKILL);
    }
}

/* A trainer rank said READY: if its predecessor died on a command of the round still open,
 * the other ranks wait for that version at the bridge (it died before its publish got
 * there, and the bridge aborts only a version some rank had published when one goes), so
 * it publishes it too, as a restarted rank of a real job resumes its step. */
static void rejoin(stress *s, proc *t)
{
    rlb_stress_cmd owed = t->owed;
    t->owed.version = 0;
    if (owed.version && owed.version == s->round) {
        command(t, owed);
        t->rejoined = 1;
        s->rejoins++;
    }
}

/* The READY of a trainer rank started for truncate_seg: the bridge refused its unsealed
 * segment with RLB_EPERM and a sentence naming the seals, or its sealed segment did not
 * shrink (EPERM). The fault counts as injected once its rank says so. */
static void truncate_outcome(stress *s, proc *p, const rlb_stress_rec *r, const char *text)
{
    int unsealed = !!(r->flags & RLB_REC_F_UNSEALED);
    p->truncate = RLB_TRUNCATE_NONE; /* its next incarnation is an honest rank */
    if (unsealed && r->rc == 0)
        violation(s, X_NOT_REFUSED, "trainer %d: the bridge took shards in an unsealed "
                  "segment", p->idx);
    else if (unsealed && !strstr(text, "F_SEAL_SHRINK"))
        violation(s, X_UNNAMED, "trainer %d: its unsealed segment was refused with %s, not "
                  "naming the missing seals: %s", p->idx, code_name(r->rc), text);
    else if (!unsealed && r->count != EPERM)
        violation(s, X_NOT_REFUSED, "trainer %d: truncating its sealed segment %s", p->idx,
                  r->count ? strerror((int)r->count) : "succeeded");
    else if (unsealed && r->count != 0)
        s->skipped[RLB_FAULT_TRUNCATE_SEG]++; /* the memfd did not shrink: nothing injected */
    else
        s->injected[RLB_FAULT_TRUNCATE_SEG]++;
}

static void on_record(stress *s, proc *p, const rlb_stress_rec *r)
{
    char text[sizeof(r->text) + 1];
    memcpy(text, r->text, sizeof(r->text));
    text[sizeof(r->text)] = 0;
    if (r->flags & RLB_REC_F_UNNAMED)
        violation(s, X_UNNAMED, "%s %d: code %d without a sentence", kind_names[p->kind],
                  p->idx, r->rc);
    switch (r->kind) {
    case RLB_REC_READY:
        p->ready = 1;
        if (r->flags & (RLB_REC_F_UNSEALED | RLB_REC_F_SEALED))
            truncate_outcome(s, p, r, text);
        rejoin(s, p);
        break;
    case RLB_REC_CONNECTED: s->connects++; break;
    case RLB_REC_SLEEP: s->sleeps++; break;
    case RLB_REC_PUBLISH: {
        vinfo *vi = version(s, r->version);
        p->busy = 0;
        s->publish_rc[code_index(r->rc)]++;
        if (r->rc == 0)
            vi->ok++;
        else if (r->rc != RLB_EPEERDEAD)
            vi->aborted++;
        if (r->rc == RLB_EABORTED && strstr(text, rlb_strerror(RLB_ENONFINITE)))
            vi->nonfinite = 1;
        if (r->rc == RLB_ETIMEDOUT)
            violation(s, X_HUNG, "trainer %d: publish %llu timed out", p->idx,
                      (unsigned long long)r->version);
        if (r->flags & RLB_REC_F_UNSEALED) { /* its bytes are gone: nothing to check */
            vi->unsealed = 1;
            round_check(s);
            break;
        }
        uint64_t want = expected_checksum(s, (uint32_t)p->idx, r->version,
                                          !!(r->flags & RLB_REC_F_POISONED));
        if (want != r->checksum)
            violation(s, X_CHECKSUM, "trainer %d, version %llu: checksum %016llx, want %016llx",
                      p->idx, (unsigned long long)r->version,
                      (unsigned long long)r->checksum, (unsigned long long)want);
        round_check(s);
        break;
    }
    case RLB_REC_SUBMIT:
        if (r->rc == 0) {
            s->submitted++;
            if (p->outstanding < MAX_SENT)
                p->sent_at[p->outstanding] = rlb__clock_ms();
            p->outstanding++;
        }
        break;
    case RLB_REC_ANSWER:
        s->answer_rc[code_index(r->rc)]++;
        if (p->outstanding > 0 && (r->rc == 0 || r->ms > 0)) {
            /* A client waits for its requests in the order it sent them. */
            memmove(p->sent_at, p->sent_at + 1, sizeof(p->sent_at) - sizeof(p->sent_at[0]));
            p->outstanding--, s->answered++;
        }
        if (r->rc == RLB_ETIMEDOUT)
            violation(s, X_HUNG, "client %d: no answer within the deadline (%.0f ms)", p->idx,
                      r->ms);
        if (r->rc == 0) {
            progress(s);
            s->samples += r->count;
            served(s, r->vmin, r->vmax, r->count);
            if (r->flags & RLB_REC_F_EXPECT_REFUSAL)
                violation(s, X_NOT_REFUSED, "client %d: an invalid request was served", p->idx);
        }
        if (r->flags & RLB_REC_F_BAD_SHAPE)
            violation(s, X_BAD_SHAPE, "client %d: %s", p->idx, text);
        break;
    case RLB_REC_PROBE:
        s->probe_rc[code_index(r->rc)]++;
        if (r->rc == RLB_ETIMEDOUT)
            violation(s, X_HUNG, "checker: probe of version %llu unanswered",
                      (unsigned long long)r->version);
        if (r->rc == 0) {
            s->probe_verdict[r->count < 3 ? r->count : 2]++;
            served(s, r->vmin, r->vmax, 1);
            if (r->count == RLB_PROBE_MISMATCH)
                violation(s, X_TORN, "version %llu: %s", (unsigned long long)r->vmin, text);
        }
        break;
    default: break;
    }
}

static void drain_records(stress *s, proc *p)
{
    rlb_stress_rec r;
    while (p->rec_fd >= 0) {
        ssize_t n = read(p->rec_fd, &r, sizeof(r));
        if (n == (ssize_t)sizeof(r)) {
            on_record(s, p, &r);
            continue;
        }
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            close(p->rec_fd);
            p->rec_fd = -1;
        }
        break;
    }
}

/* ---- Lifecycle ---------------------------------------------------------------------------- */

/* Called once p was reaped with wait status st. */
static void on_exit_of(stress *s, proc *p, int st)
{
    int ours = p->killed;
    drain_records(s, p);
    close_pipes(p);
    if (WIFSIGNALED(st) && !(ours && (WTERMSIG(st) == SIGKILL || WTERMSIG(st) == SIGTERM)))
        violation(s, X_CRASHED, "%s %d died of signal %d", kind_names[p->kind], p->idx,
                  WTERMSIG(st));
    else if (p->kind == P_BRIDGE && !ours && WIFEXITED(st))
        violation(s, X_CRASHED, "the bridge exited with status %d", WEXITSTATUS(st));
    else if ((p->kind == P_CLIENT || p->kind == P_CHECKER) && WIFEXITED(st) &&
             WEXITSTATUS(st) != 0)
        violation(s, X_CRASHED, "%s %d exited with status %d", kind_names[p->kind], p->idx,
                  WEXITSTATUS(st));
    if (p->kind == P_CLIENT && !ours && p->outstanding)
        violation(s, X_LOST, "client %d stopped with %lld request(s) unanswered", p->idx,
                  (long long)p->outstanding);
    if (p->kind == P_HOSTILE && WIFEXITED(st) && WEXITSTATUS(st) == 0)
        s->injected[p->fault]++;
    else if (p->kind == P_HOSTILE)
        s->skipped[p->fault]++;
    if (p->kind == P_TRAINER && p->busy) {
        p->owed = p->cmd;
        p->busy = 0;
        round_check(s);
    }
    p->pid = 0;
    p->ready = p->stopped = 0;
    p->outstanding = 0;
    p->died_at = rlb__clock_ms();
    if (p->kind == P_BRIDGE) {
        s->bridge_up = 0;
        /* The trainers' registrations died with it; the next bridge gets a new unit mix. */
        for (uint32_t r = 0; r < s->o.trainers; r++)
            kill_proc(&s->trainers[r], SIGKILL);
    }
}

static void reap_all(stress *s)
{
    proc *all[] = {&s->bridge, &s->checker};
    for (size_t i = 0; i < 2; i++) {
        int st;
        if (all[i]->pid > 0 && waitpid(all[i]->pid, &st, WNOHANG) == all[i]->pid)
            on_exit_of(s, all[i], st);
    }
    proc *arrays[] = {s->workers, s->trainers, s->clients, s->hostile};
    int counts[] = {MAX_WORKERS, MAX_TRAINERS, MAX_CLIENTS, MAX_HOSTILE};
    for (int a = 0; a < 4; a++)
        for (int i = 0; i < counts[a]; i++) {
            int st;
            proc *p = &arrays[a][i];
            if (p->pid > 0 && waitpid(p->pid, &st, WNOHANG) == p->pid)
                on_exit_of(s, p, st);
        }
}

/* Restarts what is missing: the bridge, whole replicas once every rank of theirs is gone,
 * trainers, clients, the checker. */
static void heal(stress *s, int64_t now)
{
    if (s->bridge.pid == 0 && now - s->bridge.died_at >= 50)
        spawn_bridge(s);
    if (!s->bridge_up) {
        if (s->bridge.pid > 0 && bridge_listening(s->sock))
            s->bridge_up = 1;
        else
            return;
    }
    for (uint32_t d = 0; d < s->o.replicas; d++) {
        proc *w = &s->workers[d * s->o.tp];
        uint32_t alive = 0;
        int64_t died = 0;
        for (uint32_t t = 0; t < s->o.tp; t++) {
            alive += w[t].pid > 0;
            died = w[t].died_at > died ? w[t].died_at : died;
        }
        if (alive == s->o.tp)
            continue;
        if (alive == 0) {
            for (uint32_t t = 0; t < s->o.tp; t++)
                spawn_worker(s, (int)(d * s->o.tp + t));
            s->restarts[P_WORKER] += s->o.tp;
        } else if (now - died > GRACE_MS) {
            for (uint32_t t = 0; t < s->o.tp; t++)
                if (w[t].pid > 0 && !w[t].killed) {
                    kill_proc(&w[t], SIGKILL);
                    s->forced_kills++;
                }
        }
    }
    for (uint32_t r = 0; r < s->o.trainers; r++)
        if (s->trainers[r].pid == 0 && now - s->trainers[r].died_at >= 100) {
            spawn_role(s, &s->trainers[r], "trainer");
            s->restarts[P_TRAINER]++;
        }
    for (uint32_t c = 0; !s->draining && c < s->o.clients; c++)
        if (s->clients[c].pid == 0 && now - s->clients[c].died_at >= 100) {
            spawn_role(s, &s->clients[c], "client");
            s->restarts[P_CLIENT]++;
        }
    if (!s->draining && s->checker.pid == 0 && now - s->checker.died_at >= 100) {
        spawn_role(s, &s->checker, "checker");
        s->restarts[P_CHECKER]++;
    }
}

/* Starts the next version when every trainer rank is registered and idle. */
static void drive(stress *s, int64_t now)
{
    if (s->round || !s->bridge_up || now < s->next_publish_at)
        return;
    for (uint32_t r = 0; r < s->o.trainers; r++)
        if (s->trainers[r].pid <= 0 || !s->trainers[r].ready || s->trainers[r].busy)
            return;
    uint64_t v = ++s->next_version;
    vinfo *vi = version(s, v);
    uint32_t poisoner = s->o.trainers;
    if (s->pending_poison) {
        s->pending_poison--;
        s->injected[RLB_FAULT_POISON]++;
        vi->poisoned = 1;
        uint64_t k = rlb__stress_key(s->o.seed, 0x706f69736f6eull, v, 0);
        poisoner = (uint32_t)(k % s->o.trainers);
        s->poison_pick = k >> 8;
    }
    vi->state = V_PUBLISHING;
    s->round = v;
    for (uint32_t r = 0; r < s->o.trainers; r++)
        command(&s->trainers[r], (rlb_stress_cmd){.version = v, .poison = r == poisoner,
                                                     .pick = (uint32_t)s->poison_pick});
    /* The trainer computes its pick from the low 32 bits; so does the checksum. */
    s->poison_pick = (uint32_t)s->poison_pick;
    round_check(s);
}

/* Live processes of an array, excluding stopped ones when asked; the target-th of them. */
static proc *choose(proc *a, int n, uint32_t target, int skip_stopped)
{
    int live = 0;
    for (int i = 0; i < n; i++)
        live += a[i].pid > 0 && !a[i].killed && !(skip_stopped && a[i].stopped);
    if (!live)
        return NULL;
    int k = (int)(target % (uint32_t)live);
    for (int i = 0; i < n; i++)
        if (a[i].pid > 0 && !a[i].killed && !(skip_stopped && a[i].stopped) && k-- == 0)
            return &a[i];
    return NULL;
}

/* Notes fault kind as applied now, hitting p (NULL: no process of ours). Returns 1. */
static int applied(stress *s, uint32_t kind, proc *p)
{
    int64_t now = rlb__clock_ms();
    if (p)
        p->hit_at = now;
    s->recent[s->n_recent++ % RECENT_FAULTS] =
        (fault_note){.at = now, .kind = kind, .target = p && p->kind != P_BRIDGE ? p->idx : -1};
    return 1;
}

/* Applies fault e. Returns 1 when done (or given up), 0 to try again later. */
static int inject(stress *s, const rlb_stress_event *e)
{
    int nw = (int)(s->o.replicas * s->o.tp);
    proc *p = NULL;
    switch (e->kind) {
    case RLB_FAULT_KILL_BRIDGE:
        if (!s->bridge_up || s->bridge.pid <= 0)
            return 0;
        p = &s->bridge;
        break;
    case RLB_FAULT_KILL_WORKER: p = choose(s->workers, nw, e->target, 1); break;
    case RLB_FAULT_KILL_TRAINER: p = choose(s->trainers, (int)s->o.trainers, e->target, 0); break;
    case RLB_FAULT_KILL_CLIENT: p = choose(s->clients, (int)s->o.clients, e->target, 0); break;
    case RLB_FAULT_STOP_WORKER:
        for (int i = 0; i < nw; i++)
            if (s->workers[i].stopped)
                return 0; /* one at a time */
        if (!s->bridge_up || !(p = choose(s->workers, nw, e->target, 1)))
            return 0;
        kill(p->pid, SIGSTOP);
        p->stopped = 1;
        p->resume_at = rlb__clock_ms() + STOP_MIN_MS + e->arg % (STOP_MAX_MS - STOP_MIN_MS);
        p->resume_kill = (int)(e->arg >> 20 & 1);
        s->injected[e->kind]++;
        return applied(s, e->kind, p);
    case RLB_FAULT_POISON: s->pending_poison++; return applied(s, e->kind, NULL);
    case RLB_FAULT_TRUNCATE_SEG: /* counted when the rank's next incarnation reports */
        if (!(p = choose(s->trainers, (int)s->o.trainers, e->target, 0)))
            return 0;
        p->truncate = e->arg & 1 ? RLB_TRUNCATE_SEALED : RLB_TRUNCATE_UNSEALED;
        kill_proc(p, SIGKILL);
        return applied(s, e->kind, p);
    default: { /* a hostile client */
        if (!s->bridge_up)
            return 0;
        proc *h = NULL;
        for (int i = 0; i < MAX_HOSTILE && !h; i++)
            if (s->hostile[i].pid == 0)
                h = &s->hostile[i];
        if (!h)
            return 0;
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            alarm(20);
            _exit(rlb__stress_hostile(s->sock, e->kind, e->arg));
        }
        if (pid < 0)
            return 0;
        *h = (proc){.pid = pid, .kind = P_HOSTILE, .idx = (int)(h - s->hostile),
                    .cmd_fd = -1, .rec_fd = -1, .fault = e->kind};
        return applied(s, e->kind, NULL);
    }
    }
    if (!p)
        return 0;
    kill_proc(p, SIGKILL);
    s->injected[e->kind]++;
    return applied(s, e->kind, p);
}

static void faults_due(stress *s, int64_t now)
{
    int64_t t = now - s->t0;
    while (s->next_ev < s->n_ev && s->ev[s->next_ev].at_ms <= t) {
        const rlb_stress_event *e = &s->ev[s->next_ev];
        if (!inject(s, e)) {
            if (t - e->at_ms < FAULT_PATIENCE_MS)
                break;
            s->skipped[e->kind]++;
        }
        s->next_ev++;
    }
    int nw = (int)(s->o.replicas * s->o.tp);
    for (int i = 0; i < nw; i++) {
        proc *w = &s->workers[i];
        if (w->pid > 0 && w->stopped && now >= w->resume_at) {
            if (w->resume_kill)
                kill_proc(w, SIGKILL);
            else
                kill(w->pid, SIGCONT);
            w->stopped = 0;
        }
    }
}

/* ---- What was pending: the report of a stall, recovery or startup violation -------- */

#define MAX_PROCS (2 + MAX_WORKERS + MAX_TRAINERS + MAX_CLIENTS)

/* The processes a report covers, in a fixed order: bridge, workers, trainer ranks, clients,
 * checker. Returns how many. */
static int run_procs(stress *s, proc **out)
{
    int n = 0;
    out[n++] = &s->bridge;
    for (uint32_t i = 0; i < s->o.replicas * s->o.tp; i++)
        out[n++] = &s->workers[i];
    for (uint32_t i = 0; i < s->o.trainers; i++)
        out[n++] = &s->trainers[i];
    for (uint32_t i = 0; i < s->o.clients; i++)
        out[n++] = &s->clients[i];
    out[n++] = &s->checker;
    return n;
}

/* 1 when p does its part, as the stall clock needs: the bridge listens, a worker runs (not
 * stopped), a trainer rank registered (said READY). Clients and the checker always are. */
static int proc_up(const stress *s, const proc *p)
{
    int alive = p->pid > 0 && !p->killed && !p->stopped;
    switch (p->kind) {
    case P_BRIDGE: return alive && s->bridge_up;
    case P_WORKER: return alive;
    case P_TRAINER: return alive && p->ready;
    default: return 1;
    }
}

/* 1 when progress is possible by design, so the stall clock runs: the bridge listens and a
 * commit can come (every trainer rank registered and a worker running; every worker, before
 * this bridge's first commit) or an answer can (a worker running, and this bridge committed
 * a version; in pause mode not followed by an abort, which leaves the workers stale). */
static int progress_possible(stress *s)
{
    int workers = 0, all_workers = 1, trainers = 1;
    for (uint32_t i = 0; i < s->o.replicas * s->o.tp; i++) {
        workers += proc_up(s, &s->workers[i]);
        all_workers &= proc_up(s, &s->workers[i]);
    }
    for (uint32_t r = 0; r < s->o.trainers; r++)
        trainers &= proc_up(s, &s->trainers[r]);
    int commit = trainers && workers && (s->bridge_commits || all_workers);
    int answer = workers && s->bridge_commits &&
                 !(s->last_aborted && !strcmp(s->o.mode, "pause"));
    return proc_up(s, &s->bridge) && (commit || answer);
}

/* Process pid's CPU times (/proc/PID/schedstat); m->pid is 0 when they cannot be read. */
static void read_cpu(pid_t pid, cpu_mark *m)
{
    char path[64];
    unsigned long long run = 0, wait = 0;
    snprintf(path, sizeof(path), "/proc/%d/schedstat", (int)pid);
    FILE *f = pid > 0 ? fopen(path, "r") : NULL;
    int ok = f && fscanf(f, "%llu %llu", &run, &wait) == 2;
    if (f)
        fclose(f);
    *m = (cpu_mark){.pid = ok ? pid : 0, .run_ns = run, .wait_ns = wait};
}

/* Every process's CPU times now: the start of a window without progress. */
static void take_marks(stress *s, int64_t now)
{
    proc *all[MAX_PROCS];
    int n = run_procs(s, all);
    for (int i = 0; i < n; i++)
        read_cpu(all[i]->pid, &all[i]->mark);
    read_cpu(getpid(), &s->self_mark);
    s->marks_at = now;
}

/* Appends to the NUL-terminated line buf of len bytes (cut where it is full). */
static void add(char *buf, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void add(char *buf, size_t len, const char *fmt, ...)
{
    size_t used = strlen(buf);
    va_list ap;
    va_start(ap, fmt);
    if (used + 1 < len)
        vsnprintf(buf + used, len - used, fmt, ap);
    va_end(ap);
}

/* The bridge's counters (a short-lived observer connection). Returns 0 with *out set (free
 * it), or the client's code. */
static int bridge_stats(const char *sock, rlb_stat_list **out)
{
    rlb_client_options o;
    rlb_client_options_init(&o);
    o.socket = sock;
    o.observer = 1;
    o.connect_timeout_ms = 1000;
    o.request_timeout_ms = 2000;
    rlb_client *c = NULL;
    *out = NULL;
    int rc = rlb_connect(&o, &c);
    if (rc == 0)
        rc = rlb_bridge_stats(c, out);
    rlb_close(c);
    return rc;
}

static int stat_of(const char *sock, const char *name, double *value)
{
    rlb_stat_list *l;
    int rc = bridge_stats(sock, &l);
    if (rc == 0)
        rc = rlb_stat_list_find(l, name, value);
    rlb_stat_list_free(l);
    return rc;
}

/* The version in flight and where each rank is with it, or why none is. */
static void round_line(stress *s, int64_t now, char *buf, size_t len)
{
    add(buf, len, "versions: %llu published, %llu committed", (unsigned long long)s->next_version,
        (unsigned long long)s->committed);
    if (s->last_commit_at)
        add(buf, len, " (the last, %llu, %.1f s ago)", (unsigned long long)s->last_committed,
            (now - s->last_commit_at) / 1000.0);
    if (!s->round) {
        add(buf, len, "; none in flight%s", s->bridge_up ? "" : ": the bridge does not listen");
        return;
    }
    add(buf, len, "; version %llu in flight:", (unsigned long long)s->round);
    for (uint32_t r = 0; r < s->o.trainers; r++) {
        const proc *t = &s->trainers[r];
        add(buf, len, " trainer %u ", r);
        if (t->busy)
            add(buf, len, "publishing for %.1f s", (now - t->busy_since) / 1000.0);
        else
            add(buf, len, t->pid > 0 ? "answered" : "gone");
        add(buf, len, r + 1 < s->o.trainers ? "," : "");
    }
}

/* The bridge's own view: its sync phase and version, generation in flight and held. */
static void bridge_line(stress *s, int64_t now, char *buf, size_t len)
{
    (void)now;
    static const char *const phases[] = {"idle", "drain", "copy", "load", "xnode"};
    static const char *const names[] = {"weight_version", "inflight", "held", "replicas_up",
                                        "replicas_joining", "loads_unanswered", "stale",
                                        "asleep", "trainers", "workers", "peers"};
    add(buf, len, "bridge (pid %d, incarnation %u): ", (int)s->bridge.pid, s->incarnation);
    rlb_stat_list *l = NULL;
    int rc = s->bridge.pid > 0 && s->bridge_up ? bridge_stats(s->sock, &l) : RLB_EPEERDEAD;
    double phase = 0, v = 0;
    if (rc == 0 && rlb_stat_list_find(l, "sync_phase", &phase) == 0 && phase >= 0 && phase < 5)
        add(buf, len, "sync %s", phases[(int)phase]);
    if (rc == 0 && phase > 0 && rlb_stat_list_find(l, "sync_version", &v) == 0)
        add(buf, len, " of version %.0f", v);
    for (size_t i = 0; rc == 0 && i < sizeof(names) / sizeof(names[0]); i++)
        if (rlb_stat_list_find(l, names[i], &v) == 0)
            add(buf, len, ", %s %.0f", names[i], v);
    if (rc < 0)
        add(buf, len, "%s", s->bridge.pid <= 0 ? "not running"
                            : !s->bridge_up ? "not listening yet"
                                            : "no answer to a stats request within 3 s");
    if (rc < 0 && rc != RLB_EPEERDEAD)
        add(buf, len, " (%s)", rlb_strerror(rc));
    rlb_stat_list_free(l);
}

/* Each client's requests in flight and the age of its oldest. */
static void requests_line(stress *s, int64_t now, char *buf, size_t len)
{
    add(buf, len, "requests in flight:");
    for (uint32_t c = 0; c < s->o.clients; c++) {
        const proc *p = &s->clients[c];
        add(buf, len, "%s client %u ", c ? ";" : "", c);
        if (p->pid <= 0)
            add(buf, len, "down");
        else if (p->outstanding == 0)
            add(buf, len, "none");
        else
            add(buf, len, "%lld, the oldest %.1f s", (long long)p->outstanding,
                (now - p->sent_at[0]) / 1000.0);
    }
}

/* What is out: stopped by the schedule, down, restarting, not registered. */
static void out_line(stress *s, int64_t now, char *buf, size_t len)
{
    proc *all[MAX_PROCS];
    int n = run_procs(s, all), any = 0;
    add(buf, len, "out:");
    for (int i = 0; i < n; i++) {
        proc *p = all[i];
        if (proc_up(s, p))
            continue;
        add(buf, len, "%s %s %d ", any++ ? ";" : "", kind_names[p->kind], p->idx);
        if (p->stopped)
            add(buf, len, "SIGSTOPped by the schedule %.1f s ago, %s in %.1f s",
                (now - p->hit_at) / 1000.0, p->resume_kill ? "killed" : "resumed",
                (p->resume_at - now) / 1000.0);
        else if (p->pid <= 0 || p->killed)
            add(buf, len, "down (restarting)");
        else
            add(buf, len, p->kind == P_BRIDGE ? "not listening yet" : "not registered yet");
        if (p->down_since)
            add(buf, len, " since %.1f s", (now - p->down_since) / 1000.0);
        if (p->hit_at && !p->stopped)
            add(buf, len, ", the last fault on it %.1f s ago", (now - p->hit_at) / 1000.0);
    }
    if (!any)
        add(buf, len, " nothing: every process is up");
}

/* The faults applied since the last progress. */
static void faults_line(stress *s, int64_t now, char *buf, size_t len)
{
    uint64_t first = s->n_recent > RECENT_FAULTS ? s->n_recent - RECENT_FAULTS : 0;
    int any = 0;
    add(buf, len, "faults since then:");
    for (uint64_t i = first; i < s->n_recent; i++) {
        const fault_note *f = &s->recent[i % RECENT_FAULTS];
        if (f->at < s->last_progress)
            continue;
        add(buf, len, "%s %s", any++ ? "," : "", rlb__stress_fault_name(f->kind));
        if (f->target >= 0)
            add(buf, len, " (%d)", f->target);
        add(buf, len, " at %.1f s", run_s(s, f->at));
    }
    add(buf, len, any ? "" : " none");
    if (any && first && s->recent[first % RECENT_FAULTS].at >= s->last_progress)
        add(buf, len, " (the last %d)", RECENT_FAULTS);
    add(buf, len, "; now %.1f s", run_s(s, now));
}

/* Load average and CPU pressure: how much the machine had to give. */
static void machine_line(stress *s, int64_t now, char *buf, size_t len)
{
    (void)s, (void)now;
    char text[256] = "";
    FILE *f = fopen("/proc/loadavg", "r");
    double l1 = 0, l5 = 0, l15 = 0;
    if (f && fscanf(f, "%lf %lf %lf", &l1, &l5, &l15) == 3)
        add(buf, len, "load average %.2f %.2f %.2f on %ld CPUs", l1, l5, l15,
            sysconf(_SC_NPROCESSORS_ONLN));
    if (f)
        fclose(f);
    f = fopen("/proc/pressure/cpu", "r");
    if (f && fgets(text, sizeof(text), f)) { /* "some avg10=... avg60=... avg300=... total=..." */
        text[strcspn(text, "\n")] = 0;
        char *total = strstr(text, " total=");
        if (total)
            *total = 0;
        add(buf, len, "; CPU pressure %s", text);
    }
    if (f)
        fclose(f);
}

/* Each process's CPU time and time waiting for a CPU since the marks. */
static void cpu_line(stress *s, int64_t now, char *buf, size_t len)
{
    proc *all[MAX_PROCS];
    int n = run_procs(s, all);
    add(buf, len, "over the last %.1f s, seconds on a CPU / waiting for one, and state now:",
        (now - s->marks_at) / 1000.0);
    for (int i = 0; i <= n; i++) {
        const proc *p = i < n ? all[i] : NULL;
        pid_t pid = p ? p->pid : getpid();
        const cpu_mark *was = p ? &p->mark : &s->self_mark;
        cpu_mark m;
        char id[32], state;
        int ppid;
        read_cpu(pid, &m);
        snprintf(id, sizeof(id), "%d", (int)pid);
        if (p && p->kind != P_BRIDGE && p->kind != P_CHECKER)
            add(buf, len, " %s %d", kind_names[p->kind], p->idx);
        else
            add(buf, len, " %s", p ? kind_names[p->kind] : "rlb stress");
        if (!m.pid || proc_stat(id, &state, &ppid) < 0)
            add(buf, len, " -,");
        else if (was->pid != m.pid)
            add(buf, len, " %.2f/%.2f %c (started since),", m.run_ns / 1e9, m.wait_ns / 1e9,
                state);
        else
            add(buf, len, " %.2f/%.2f %c,", (m.run_ns - was->run_ns) / 1e9,
                (m.wait_ns - was->wait_ns) / 1e9, state);
    }
    buf[strlen(buf) - 1] = 0;
}

/* How long since the last progress, and how much of it counted for the stall clock. */
static void window_line(stress *s, int64_t now, char *buf, size_t len)
{
    add(buf, len, "pending at %.1f s: the last commit or answered request %.1f s ago",
        run_s(s, now), (now - s->last_progress) / 1000.0);
    if (s->t0)
        add(buf, len, ", %.1f s of it with progress possible", s->quiet_ms / 1000.0);
}

/* Prints what was pending at `now`, after a stall, recovery or startup violation: enough to
 * tell a starved machine from a stuck protocol (file comment). */
static void report_pending(stress *s, int64_t now)
{
    void (*const lines[])(stress *, int64_t, char *, size_t) = {
        window_line, round_line, bridge_line, requests_line, out_line, faults_line,
        machine_line, cpu_line};
    char buf[2048];
    for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++) {
        buf[0] = 0;
        lines[i](s, now, buf, sizeof(buf));
        fprintf(stderr, "rlb stress:   %s\n", buf);
    }
}

static void watchdogs(stress *s, int64_t now)
{
    for (uint32_t r = 0; r < s->o.trainers; r++) {
        proc *t = &s->trainers[r];
        if (t->pid > 0 && t->busy && now - t->busy_since > PUBLISH_BOUND_MS) {
            violation(s, X_HUNG, "trainer %u: publish %llu unanswered after %d s", r,
                      (unsigned long long)s->round, PUBLISH_BOUND_MS / 1000);
            kill_proc(t, SIGKILL);
        }
    }
    /* A rank carrying out its predecessor's command completes the version only together
     * with the round's other ranks: once none of them waits any more, it cannot. */
    int waiting = 0, orphans = 0;
    for (uint32_t r = 0; r < s->o.trainers; r++) {
        waiting += s->trainers[r].busy && !s->trainers[r].rejoined;
        orphans += s->trainers[r].busy && s->trainers[r].rejoined;
    }
    if (!orphans || waiting)
        s->orphaned_at = 0;
    else if (!s->orphaned_at)
        s->orphaned_at = now;
    for (uint32_t r = 0; s->orphaned_at && now - s->orphaned_at > 2 * PEER_TIMEOUT_MS &&
                         r < s->o.trainers; r++)
        if (s->trainers[r].busy && s->trainers[r].rejoined) {
            kill_proc(&s->trainers[r], SIGKILL);
            s->forced_kills++;
        }
    if (!s->t0)
        return; /* startup has its own bound (first_start) */
    proc *all[MAX_PROCS];
    int n = run_procs(s, all);
    for (int i = 0; i < n; i++) {
        proc *p = all[i];
        if (proc_up(s, p)) {
            p->down_since = 0;
            continue;
        }
        if (!p->down_since)
            p->down_since = now;
        int64_t from = p->down_since > p->hit_at ? p->down_since : p->hit_at;
        if (p->kind != P_BRIDGE && s->bridge.hit_at > from)
            from = s->bridge.hit_at;
        if (now - from > RECOVERY_MS) {
            violation(s, X_RECOVERY, "%s %d not up %d s after it went down and after the last "
                      "fault that hit it or its bridge", kind_names[p->kind], p->idx,
                      RECOVERY_MS / 1000);
            report_pending(s, now);
            p->down_since = now; /* again after RECOVERY_MS more */
        }
    }
    if (progress_possible(s))
        s->quiet_ms += now - s->last_watch;
    s->last_watch = now;
    if (s->last_progress > s->marks_at && now - s->marks_at >= 1000)
        take_marks(s, now);
    if (s->quiet_ms > STALL_MS) {
        violation(s, X_STALL, "no commit and no answered request for %.0f s, %d s of it with "
                  "progress possible", (now - s->last_progress) / 1000.0, STALL_MS / 1000);
        report_pending(s, now);
        note_gap(s, now);
        s->quiet_ms = 0;
    }
}

/* What a turn of the loop does beyond taking records and exits. */
enum {
    TURN_QUIET = 0, /* nothing more */
    TURN_RUN = 1,   /* restarts, publishes, faults, watchdogs */
    TURN_DRAIN = 2  /* the same without faults: startup, and the end, where the stopped
                       clients wait for their answers, some for the next version (a request
                       waits for it when every replica was lost: they rejoin with it) */
};

/* One turn of the loop (mode: TURN_*). */
static void turn(stress *s, int mode)
{
    struct pollfd pf[MAX_TRAINERS + MAX_CLIENTS + 1];
    proc *owner[MAX_TRAINERS + MAX_CLIENTS + 1];
    int n = 0;
    for (uint32_t r = 0; r < s->o.trainers; r++)
        if (s->trainers[r].rec_fd >= 0)
            owner[n] = &s->trainers[r], pf[n++] = (struct pollfd){s->trainers[r].rec_fd, POLLIN, 0};
    for (uint32_t c = 0; c < s->o.clients; c++)
        if (s->clients[c].rec_fd >= 0)
            owner[n] = &s->clients[c], pf[n++] = (struct pollfd){s->clients[c].rec_fd, POLLIN, 0};
    if (s->checker.rec_fd >= 0)
        owner[n] = &s->checker, pf[n++] = (struct pollfd){s->checker.rec_fd, POLLIN, 0};
    if (poll(pf, (nfds_t)n, 10) > 0)
        for (int i = 0; i < n; i++)
            if (pf[i].revents)
                drain_records(s, owner[i]);
    reap_all(s);
    int64_t now = rlb__clock_ms();
    if (mode != TURN_QUIET) {
        heal(s, now);
        drive(s, now);
        if (mode == TURN_RUN)
            faults_due(s, now);
        watchdogs(s, now);
    }
}

/* ---- Start, end, report -------------------------------------------------------------------- */

/* Startup, before any fault: the bridge and every replica (the bridge's fds then, with only
 * its workers connected, are the baseline of the fd check), then the trainer ranks, the
 * clients and the checker until a first version commits, all within STARTUP_MS of the
 * start. Returns 0, or -1 (a startup violation unless interrupted). */
static int first_start(stress *s)
{
    spawn_bridge(s);
    int64_t deadline = s->start + STARTUP_MS;
    while (!s->bridge_up && rlb__clock_ms() < deadline && !interrupted) {
        s->bridge_up = s->bridge.pid > 0 && bridge_listening(s->sock);
        reap_all(s);
        rlb__stress_sleep_ms(20);
    }
    for (uint32_t i = 0; s->bridge_up && i < s->o.replicas * s->o.tp; i++)
        spawn_worker(s, (int)i);
    double up = 0;
    while (s->bridge_up && up < s->o.replicas && rlb__clock_ms() < deadline && !interrupted) {
        if (stat_of(s->sock, "replicas_up", &up) < 0)
            up = 0;
        reap_all(s);
        rlb__stress_sleep_ms(50);
    }
    if (up >= s->o.replicas) {
        rlb__stress_sleep_ms(300); /* the bridge drops our stats connection */
        s->fd_bridge0 = count_fds(s->bridge.pid);
    }
    while (up >= s->o.replicas && !s->committed && rlb__clock_ms() < deadline && !interrupted)
        turn(s, TURN_DRAIN);
    if (s->committed || interrupted)
        return s->committed ? 0 : -1;
    if (up < s->o.replicas)
        violation(s, X_STARTUP, "the bridge and its %u replicas were not up within %d s",
                  s->o.replicas, STARTUP_MS / 1000);
    else
        violation(s, X_STARTUP, "no version committed within %d s of the start",
                  STARTUP_MS / 1000);
    report_pending(s, rlb__clock_ms());
    return -1;
}

/* Waits up to ms for p to exit, turning the loop in `mode` meanwhile; kills it after. */
static void wait_gone(stress *s, proc *p, int ms, int mode)
{
    for (int64_t end = rlb__clock_ms() + ms; p->pid > 0 && rlb__clock_ms() < end;)
        turn(s, mode);
    if (p->pid > 0) {
        kill_proc(p, SIGKILL);
        s->forced_kills++;
        while (p->pid > 0)
            turn(s, TURN_QUIET);
    }
}

/* Stops everything in order and checks what is left: the clients and the checker finish
 * first while the trainer ranks go on publishing, then the trainers stop. */
static void finish(stress *s)
{
    s->draining = 1;
    for (uint32_t c = 0; c < s->o.clients; c++)
        if (s->clients[c].pid > 0)
            kill(s->clients[c].pid, SIGTERM); /* not p->killed: they must answer everything */
    if (s->checker.pid > 0)
        kill(s->checker.pid, SIGTERM);
    for (int i = 0; i < (int)(s->o.replicas * s->o.tp); i++)
        if (s->workers[i].stopped) {
            kill(s->workers[i].pid, SIGCONT);
            s->workers[i].stopped = 0;
        }
    for (uint32_t c = 0; c < s->o.clients; c++)
        wait_gone(s, &s->clients[c], STOP_GRACE_MS, TURN_DRAIN);
    wait_gone(s, &s->checker, STOP_GRACE_MS, TURN_DRAIN);
    for (uint32_t r = 0; r < s->o.trainers; r++)
        if (s->trainers[r].cmd_fd >= 0) {
            close(s->trainers[r].cmd_fd); /* EOF: they close their client and exit */
            s->trainers[r].cmd_fd = -1;
        }
    for (uint32_t r = 0; r < s->o.trainers; r++) {
        wait_gone(s, &s->trainers[r], STOP_GRACE_MS, TURN_QUIET);
        s->skipped[RLB_FAULT_TRUNCATE_SEG] += s->trainers[r].truncate != RLB_TRUNCATE_NONE;
    }
    for (int i = 0; i < MAX_HOSTILE; i++)
        wait_gone(s, &s->hostile[i], 20000, TURN_QUIET);
    /* Only the workers are connected now, as when the baseline was taken. */
    int whole = 1;
    for (int i = 0; i < (int)(s->o.replicas * s->o.tp); i++)
        whole &= s->workers[i].pid > 0;
    if (s->bridge.pid > 0 && whole) {
        double up = 0;
        for (int64_t end = rlb__clock_ms() + 20000; up < s->o.replicas && rlb__clock_ms() < end;) {
            if (stat_of(s->sock, "replicas_up", &up) < 0)
                up = 0;
            turn(s, TURN_QUIET);
        }
        for (int64_t end = rlb__clock_ms() + 300; rlb__clock_ms() < end;)
            turn(s, TURN_QUIET);
        int fds = count_fds(s->bridge.pid);
        if (up >= s->o.replicas && fds > s->fd_bridge0)
            violation(s, X_LEFTOVERS, "the bridge holds %d fds with only its workers connected, "
                      "%d at the start", fds, s->fd_bridge0);
    }
    /* A bridge killed -9 leaves its socket for the next one to replace. When the last one
     * does not listen (the schedule killed it near the end and its successor was stopped
     * while it started, or none was started), that socket is the killed one's: gone here. */
    int listening = s->bridge.pid > 0 && bridge_listening(s->sock);
    if (s->bridge.pid > 0) {
        kill(s->bridge.pid, SIGTERM);
        s->bridge.killed = 1;
        wait_gone(s, &s->bridge, 15000, TURN_QUIET);
    }
    if (!listening)
        unlink(s->sock);
    for (int i = 0; i < (int)(s->o.replicas * s->o.tp); i++)
        wait_gone(s, &s->workers[i], 15000, TURN_QUIET);
    /* Nothing may be left: no child (zombie or running), no socket, nothing in /dev/shm. */
    DIR *d = opendir("/proc");
    for (struct dirent *e; d && (e = readdir(d));) {
        int ppid;
        char state;
        if (e->d_name[0] < '0' || e->d_name[0] > '9' || proc_stat(e->d_name, &state, &ppid) < 0)
            continue;
        if (ppid == getpid())
            violation(s, X_LEFTOVERS, "process %s (state %c) is still our child", e->d_name,
                      state);
    }
    if (d)
        closedir(d);
    d = opendir(s->dir);
    for (struct dirent *e; d && (e = readdir(d));)
        if (e->d_name[0] != '.')
            violation(s, X_LEFTOVERS, "left in the socket directory: %s", e->d_name);
    if (d)
        closedir(d);
    d = opendir("/dev/shm");
    for (struct dirent *e; d && (e = readdir(d));) {
        /* every process this run started is gone when this is asked */
        int seen = !rlb__shm_entry_ours(e->d_name);
        for (int i = 0; !seen && i < s->n_shm_before; i++)
            seen = !strcmp(s->shm_before[i], e->d_name);
        if (!seen)
            violation(s, X_LEFTOVERS, "left in /dev/shm: %s", e->d_name);
    }
    if (d)
        closedir(d);
    int fds = count_fds(getpid());
    if (fds > s->fd_self0)
        violation(s, X_LEFTOVERS, "rlb stress holds %d fds, %d at the start", fds, s->fd_self0);
    /* Every version a result was stamped with must have committed. */
    for (uint64_t v = 0; v < s->v_cap; v++) {
        const vinfo *vi = &s->v[v];
        if (!vi->served)
            continue;
        if (vi->state == V_UNKNOWN || vi->state == V_PUBLISHING)
            s->served_unknown++; /* its bridge died before any rank heard: it committed */
        else if (vi->state != V_COMMITTED)
            violation(s, X_UNCOMMITTED, "%u sample(s) stamped with version %llu, which %s",
                      vi->served, (unsigned long long)v,
                      vi->state == V_ABORTED ? "aborted" : "was never published");
    }
}

static uint64_t total(const uint64_t *a, int n)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++)
        t += a[i];
    return t;
}

static void print_codes(FILE *f, const uint64_t *rc, int json)
{
    int first = 1;
    for (int i = 1; i < RLB_E_COUNT_; i++)
        if (rc[i]) {
            fprintf(f, json ? "%s\"RLB_%s\": %llu" : "%sRLB_%s %llu", first ? "" : ", ",
                    code_name(-i), (unsigned long long)rc[i]);
            first = 0;
        }
    if (first && !json)
        fprintf(f, "-");
}

static void print_table(const stress *s, double seconds, uint64_t faults)
{
    printf("\nrlb stress: seed %llu, %.0f s, bridge + %u x %u workers, %u trainers, %u clients, "
           "%s mode\n", (unsigned long long)s->o.seed, seconds, s->o.replicas, s->o.tp,
           s->o.trainers, s->o.clients, s->o.mode);
    if (s->t0)
        printf("  startup: %.1f s (bridge, every replica, first commit); longest without a "
               "commit or an answer: %.1f s, %.1f s of it with progress possible\n",
               (s->t0 - s->start) / 1000.0, s->max_gap / 1000.0, s->max_quiet / 1000.0);
    printf("  %-14s %8s %8s\n", "fault", "injected", "skipped");
    for (int k = 0; k < RLB_FAULT_COUNT_; k++)
        printf("  %-14s %8llu %8llu\n", rlb__stress_fault_name((uint32_t)k),
               (unsigned long long)s->injected[k], (unsigned long long)s->skipped[k]);
    printf("  %-14s %8llu\n", "total", (unsigned long long)faults);
    printf("  versions: %llu published, %llu committed, %llu aborted, %llu unknown (bridge "
           "killed mid-publish)\n", (unsigned long long)s->next_version,
           (unsigned long long)s->committed, (unsigned long long)s->aborted,
           (unsigned long long)s->unknown);
    printf("  poisoned versions: %llu aborted, %llu of them naming non-finite values as the "
           "cause\n", (unsigned long long)s->poison_aborted, (unsigned long long)s->poison_named);
    printf("  publish failures: ");
    print_codes(stdout, s->publish_rc, 0);
    printf("\n  requests: %llu submitted, %llu answered, %llu done (%llu samples); failed: ",
           (unsigned long long)s->submitted, (unsigned long long)s->answered,
           (unsigned long long)s->answer_rc[0], (unsigned long long)s->samples);
    print_codes(stdout, s->answer_rc, 0);
    printf("\n  probes: %llu match, %llu near ties, %llu differ; failed: ",
           (unsigned long long)s->probe_verdict[0], (unsigned long long)s->probe_verdict[1],
           (unsigned long long)s->probe_verdict[2]);
    print_codes(stdout, s->probe_rc, 0);
    printf("\n  restarts: bridge %llu, workers %llu, trainers %llu (%llu of them publishing their "
           "predecessor's version), clients %llu, checker %llu; sleeps %llu\n",
           (unsigned long long)s->restarts[P_BRIDGE], (unsigned long long)s->restarts[P_WORKER],
           (unsigned long long)s->restarts[P_TRAINER], (unsigned long long)s->rejoins,
           (unsigned long long)s->restarts[P_CLIENT], (unsigned long long)s->restarts[P_CHECKER],
           (unsigned long long)s->sleeps);
    printf("  %-14s %8s\n", "invariant", "violated");
    for (int k = 0; k < X_COUNT; k++)
        printf("  %-14s %8llu\n", violation_names[k], (unsigned long long)s->x[k]);
    fflush(stdout);
}

static void report(stress *s, double seconds)
{
    uint64_t faults = total(s->injected, RLB_FAULT_COUNT_);
    uint64_t bad = total(s->x, X_COUNT);
    note_gap(s, rlb__clock_ms());
    if (!s->o.json)
        print_table(s, seconds, faults);
    /* One JSON line. */
    printf("{\"seed\": %llu, \"duration_s\": %.1f, \"startup_s\": %.1f, \"mode\": \"%s\", "
           "\"replicas\": %u, \"tp\": %u, \"trainers\": %u, \"clients\": %u, "
           "\"no_progress_s\": {\"longest\": %.1f, \"possible\": %.1f}, \"faults\": {",
           (unsigned long long)s->o.seed, seconds,
           s->t0 ? (s->t0 - s->start) / 1000.0 : (rlb__clock_ms() - s->start) / 1000.0, s->o.mode,
           s->o.replicas, s->o.tp, s->o.trainers, s->o.clients, s->max_gap / 1000.0,
           s->max_quiet / 1000.0);
    for (int k = 0; k < RLB_FAULT_COUNT_; k++)
        printf("%s\"%s\": %llu", k ? ", " : "", rlb__stress_fault_name((uint32_t)k),
               (unsigned long long)s->injected[k]);
    printf("}, \"faults_total\": %llu, \"versions\": {\"published\": %llu, \"committed\": %llu, "
           "\"aborted\": %llu, \"unknown\": %llu, \"served_unknown\": %llu, \"poison_aborted\": %llu, \"poison_nonfinite\": "
           "%llu}, \"publish_failed\": {",
           (unsigned long long)faults, (unsigned long long)s->next_version,
           (unsigned long long)s->committed, (unsigned long long)s->aborted,
           (unsigned long long)s->unknown, (unsigned long long)s->served_unknown,
           (unsigned long long)s->poison_aborted, (unsigned long long)s->poison_named);
    print_codes(stdout, s->publish_rc, 1);
    printf("}, \"requests\": {\"submitted\": %llu, \"answered\": %llu, \"done\": %llu, "
           "\"samples\": %llu, \"failed\": {", (unsigned long long)s->submitted,
           (unsigned long long)s->answered, (unsigned long long)s->answer_rc[0],
           (unsigned long long)s->samples);
    print_codes(stdout, s->answer_rc, 1);
    printf("}}, \"probes\": {\"match\": %llu, \"near_tie\": %llu, \"differ\": %llu}, "
           "\"restarts\": {\"bridge\": %llu, \"workers\": %llu, \"trainers\": %llu, "
           "\"trainers_rejoined\": %llu, \"clients\": %llu}, \"violations\": {",
           (unsigned long long)s->probe_verdict[0], (unsigned long long)s->probe_verdict[1],
           (unsigned long long)s->probe_verdict[2], (unsigned long long)s->restarts[P_BRIDGE],
           (unsigned long long)s->restarts[P_WORKER], (unsigned long long)s->restarts[P_TRAINER],
           (unsigned long long)s->rejoins, (unsigned long long)s->restarts[P_CLIENT]);
    for (int k = 0; k < X_COUNT; k++)
        printf("%s\"%s\": %llu", k ? ", " : "", violation_names[k],
               (unsigned long long)s->x[k]);
    printf("}, \"violations_total\": %llu, \"ok\": %s}\n", (unsigned long long)bad,
           bad ? "false" : "true");
    if (bad)
        fprintf(stderr, "rlb stress: FAILED (%llu violations; first: %s); logs in %s; replay "
                "with --seed %llu\n", (unsigned long long)bad, s->first_violation, s->logdir,
                (unsigned long long)s->o.seed);
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: rlb stress [--duration S] [--seed N] [--trainers T] [--replicas R] [--tp K]\n"
            "                  [--clients C] [--mode pause|staged] [--faults LIST] [--json]\n"
            "  Runs a bridge, R x K workers, T trainer ranks, C generating clients and a\n"
            "  checker (CPU backend, tiny model) at full load for S seconds (default 60),\n"
            "  injects the faults of LIST (default all: ");
    for (int k = 0; k < RLB_FAULT_COUNT_; k++)
        fprintf(f, "%s%s", k ? "," : "", rlb__stress_fault_name((uint32_t)k));
    fprintf(f, ") from\n"
               "  the schedule of seed N (default 1), checks the invariants and prints a table\n"
               "  and one JSON line (--json: the JSON line only). Exit 0 when nothing was\n"
               "  violated, 1 otherwise (the seed replays the run), 2 on bad usage.\n");
}

/* A count option in [1, hi]. Returns 0 or 2 (message printed). */
static int count_opt(const char *opt, const char *s, long hi, uint32_t *out)
{
    long v = 0;
    int rc = rlb__cli_long("stress", opt, s, 1, hi, &v);
    if (rc == 0)
        *out = (uint32_t)v;
    return rc;
}

static int parse(int argc, char **argv, opts *o)
{
    static const struct option longopts[] = {
        {"duration", required_argument, NULL, 'd'}, {"seed", required_argument, NULL, 's'},
        {"trainers", required_argument, NULL, 't'}, {"replicas", required_argument, NULL, 'r'},
        {"tp", required_argument, NULL, 'k'},       {"clients", required_argument, NULL, 'c'},
        {"mode", required_argument, NULL, 'm'},     {"faults", required_argument, NULL, 'f'},
        {"json", no_argument, NULL, 'j'},           {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    *o = (opts){.duration_s = 60, .seed = 1, .trainers = 2, .replicas = 2, .tp = 1,
                .clients = 3, .mode = "pause", .faults = RLB_FAULTS_ALL};
    char err[128];
    int c, rc = 0;
    long v = 0;
    rlb_sync_mode sync;
    optind = 1;
    while (rc == 0 && (c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'd':
            if ((rc = rlb__cli_long("stress", "duration", optarg, 1, 7 * 86400, &v)) == 0)
                o->duration_s = (int)v;
            break;
        case 's': rc = rlb__cli_u64("stress", "seed", optarg, 0, UINT64_MAX, &o->seed); break;
        case 't': rc = count_opt("trainers", optarg, MAX_TRAINERS, &o->trainers); break;
        case 'r': rc = count_opt("replicas", optarg, MAX_WORKERS, &o->replicas); break;
        case 'k': rc = count_opt("tp", optarg, MAX_WORKERS, &o->tp); break;
        case 'c': rc = count_opt("clients", optarg, MAX_CLIENTS, &o->clients); break;
        case 'm':
            o->mode = optarg;
            if (rlb__sync_mode_parse(o->mode, &sync) < 0)
                rc = rlb__cli_bad("stress", "mode", optarg, "pause or staged");
            break;
        case 'f':
            if (rlb__stress_parse_faults(optarg, &o->faults, err, sizeof(err)) < 0) {
                fprintf(stderr, "rlb stress: --faults: %s\n", err);
                return 2;
            }
            break;
        case 'j': o->json = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (rc)
        return rc;
    if (optind < argc) {
        fprintf(stderr, "rlb stress: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (o->replicas * o->tp > MAX_WORKERS) { /* each at most MAX_WORKERS: no overflow */
        fprintf(stderr, "rlb stress: --replicas %u x --tp %u is %u workers; at most %d\n",
                o->replicas, o->tp, o->replicas * o->tp, MAX_WORKERS);
        return 2;
    }
    return -1;
}

static int setup(stress *s)
{
    ssize_t n = readlink("/proc/self/exe", s->self, sizeof(s->self) - 1);
    if (n <= 0)
        return -1;
    s->self[n] = 0;
    strcpy(s->dir, "/tmp/rlb-stress-XXXXXX");
    strcpy(s->logdir, "/tmp/rlb-stress-logs-XXXXXX");
    if (!mkdtemp(s->dir) || !mkdtemp(s->logdir))
        return -1;
    snprintf(s->sock, sizeof(s->sock), "%s/bridge", s->dir);
    char ms[16];
    snprintf(ms, sizeof(ms), "%d", PEER_TIMEOUT_MS);
    setenv("RLB_PEER_TIMEOUT_MS", ms, 0);
    snprintf(ms, sizeof(ms), "%d", HEARTBEAT_MS);
    setenv("RLB_HEARTBEAT_MS", ms, 0);
    setenv("RLB_THREADS", "1", 0);
    DIR *d = opendir("/dev/shm");
    for (struct dirent *e; d && (e = readdir(d)) && s->n_shm_before < 256;)
        if (e->d_name[0] != '.')
            s->shm_before[s->n_shm_before++] = strdup(e->d_name);
    if (d)
        closedir(d);
    int k = rlb__stress_schedule(s->o.seed, (int64_t)s->o.duration_s * 1000, s->o.faults, &s->ev);
    if (k < 0)
        return -1;
    s->n_ev = k;
    proc *arrays[] = {s->workers, s->trainers, s->clients, s->hostile};
    int counts[] = {MAX_WORKERS, MAX_TRAINERS, MAX_CLIENTS, MAX_HOSTILE};
    int kinds[] = {P_WORKER, P_TRAINER, P_CLIENT, P_HOSTILE};
    for (int a = 0; a < 4; a++)
        for (int i = 0; i < counts[a]; i++)
            arrays[a][i] = (proc){.kind = kinds[a], .idx = i, .cmd_fd = -1, .rec_fd = -1};
    s->bridge = (proc){.kind = P_BRIDGE, .cmd_fd = -1, .rec_fd = -1};
    s->checker = (proc){.kind = P_CHECKER, .cmd_fd = -1, .rec_fd = -1};
    return 0;
}

static void remove_logs(const char *dir)
{
    DIR *d = opendir(dir);
    char path[400];
    for (struct dirent *e; d && (e = readdir(d));)
        if (e->d_name[0] != '.') {
            snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
            unlink(path);
        }
    if (d)
        closedir(d);
    rmdir(dir);
}

int rlb__cmd_stress(int argc, char **argv)
{
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--role")) {
            const char *role = argv[i + 1];
            return !strcmp(role, "trainer")   ? rlb__stress_trainer(argc, argv)
                   : !strcmp(role, "client")  ? rlb__stress_client(argc, argv)
                   : !strcmp(role, "checker") ? rlb__stress_checker(argc, argv)
                                              : 2;
        }
    stress *s = calloc(1, sizeof(*s));
    if (!s)
        return 1;
    int rc = parse(argc, argv, &s->o);
    if (rc >= 0) {
        free(s);
        return rc;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    if (setup(s) < 0) {
        fprintf(stderr, "rlb stress: cannot set up: %s\n", strerror(errno));
        free(s);
        return 1;
    }
    s->fd_self0 = count_fds(getpid());
    if (!s->o.json)
        printf("rlb stress: seed %llu, %d s, %d faults scheduled; logs in %s\n",
               (unsigned long long)s->o.seed, s->o.duration_s, s->n_ev, s->logdir);
    fflush(stdout);
    s->start = s->last_progress = rlb__clock_ms();
    take_marks(s, s->start);
    if (first_start(s) == 0) {
        progress(s);
        s->t0 = s->last_watch = s->last_progress;
        take_marks(s, s->t0);
        if (!s->o.json)
            fprintf(stderr, "rlb stress: up in %.1f s (bridge, %u replicas, version %llu "
                    "committed); faults from now on\n", (s->t0 - s->start) / 1000.0,
                    s->o.replicas, (unsigned long long)s->last_committed);
        int64_t end = s->t0 + (int64_t)s->o.duration_s * 1000, next_line = s->t0 + 10000;
        while (!interrupted && rlb__clock_ms() < end) {
            turn(s, TURN_RUN);
            if (!s->o.json && rlb__clock_ms() >= next_line) {
                next_line += 10000;
                fprintf(stderr, "rlb stress: %3.0f s: %llu versions committed, %llu requests "
                        "done, %llu faults, %llu violations\n", (rlb__clock_ms() - s->t0) / 1000.0,
                        (unsigned long long)s->committed, (unsigned long long)s->answer_rc[0],
                        (unsigned long long)total(s->injected, RLB_FAULT_COUNT_),
                        (unsigned long long)total(s->x, X_COUNT));
            }
        }
    }
    finish(s);
    double seconds = (rlb__clock_ms() - s->start) / 1000.0;
    uint64_t bad = total(s->x, X_COUNT);
    report(s, s->t0 ? (rlb__clock_ms() - s->t0) / 1000.0 : seconds);
    if (!bad)
        remove_logs(s->logdir);
    rmdir(s->dir);
    for (int i = 0; i < s->n_shm_before; i++)
        free(s->shm_before[i]);
    free(s->ev);
    free(s->v);
    free(s);
    return interrupted ? 130 : bad ? 1 : 0;
}
