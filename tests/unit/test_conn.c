/* test_conn: connections between processes (common/conn.c) over real AF_UNIX sockets.
 *
 * Covers the socket directory rules, the handshake (each ring carries one direction), fd
 * passing with SCM_RIGHTS, refusals (another ABI version, a malformed or missing hello),
 * what the connecting side accepts from a listener (a hand-written listener answers with
 * one field changed at a time; whatever the answer, each fd it carried is closed once: a
 * close of an fd that is not open is counted through -Wl,--wrap=close), stale and busy socket paths, and peers killed with -9: one
 * in the middle of a fragmented message while the survivor sleeps on its ring, one holding
 * an uncommitted claim. The survivor learns of the death within 1 s through the socket,
 * drops the partial message, and no segment is left in /dev/shm (the killed child also
 * held a segment of the shm_open fallback).
 *
 * Run as `test_conn uid` it checks peers of another uid instead: as root, a child drops to
 * uid/gid 65534 and connects. Three paths are taken, each asserted on both sides: the
 * socket directory (0700, ours) stops the child in the kernel and the listener sees
 * nobody; with the directory and socket opened up by the test, the listener's SO_PEERCRED
 * check refuses a raw hello; and rlb__conn_connect in the child refuses the listener
 * (root is not its uid) before saying hello. Not root, or no setuid: exit 77 (skip).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/atomics.h"
#include "common/clock.h"
#include "common/conn.h"
#include "common/segmsg.h"
#include "common/shm.h"
#include "rlb/rlb.h"

#define RING 8192u     /* capacity of each ring in these tests */
#define WAIT_MS 5000   /* hang guard of every wait that should end at once */
#define NOBODY 65534   /* the uid and gid a child drops to */
#define SEG_BYTES 4096 /* size of the segments passed as fds */

/* ---- Fixtures ------------------------------------------------------------------------ */

typedef struct scratch {
    char dir[64];   /* private directory, mode 0700 */
    char path[128]; /* socket path inside it */
} scratch;

static void scratch_make(scratch *s)
{
    strcpy(s->dir, "/tmp/rlb-test-conn-XXXXXX");
    assert_non_null(mkdtemp(s->dir));
    snprintf(s->path, sizeof(s->path), "%s/sock", s->dir);
}

/* Removes the directory, which must be empty: a listener removes its socket at close. */
static void scratch_remove(scratch *s)
{
    assert_int_equal(rmdir(s->dir), 0);
}

/* Accepts the next peer, waiting up to WAIT_MS for one to knock. */
static int accept_within(rlb_listener *l, rlb_conn **c)
{
    struct pollfd p = {.fd = rlb__listener_fd(l), .events = POLLIN};
    if (poll(&p, 1, WAIT_MS) != 1)
        return RLB_ETIMEDOUT;
    return rlb__listener_accept(l, c);
}

/* rlb__conn_connect waits for the listener's welcome, so it runs in a thread while the
 * test thread plays the listener. */
typedef struct dialer {
    const char *path; /* where to connect */
    uint64_t ring;    /* ring capacity it asks for, 0 = the listener's */
    rlb_conn *conn;   /* the connection, when rc == 0 */
    int rc;           /* what rlb__conn_connect returned */
    pthread_t thread; /* runs dial_thread */
} dialer;

static void *dial_thread(void *arg)
{
    dialer *d = arg;
    d->rc = rlb__conn_connect_abi(d->path, WAIT_MS, d->ring, &d->conn, NULL);
    return NULL;
}

static void dial_start(dialer *d, const char *path)
{
    *d = (dialer){.path = path};
    assert_int_equal(pthread_create(&d->thread, NULL, dial_thread, d), 0);
}

static int dial_finish(dialer *d)
{
    assert_int_equal(pthread_join(d->thread, NULL), 0);
    return d->rc;
}

typedef struct pair {
    scratch s;      /* where the listener lives */
    rlb_listener *l; /* the listener */
    rlb_conn *srv;  /* the listener's side of the connection */
    rlb_conn *cli;  /* the peer's side */
} pair;

static void pair_make(pair *p)
{
    scratch_make(&p->s);
    assert_int_equal(rlb__listener_open(p->s.path, RING, &p->l), 0);
    dialer d;
    dial_start(&d, p->s.path);
    assert_int_equal(accept_within(p->l, &p->srv), 0);
    assert_int_equal(dial_finish(&d), 0);
    p->cli = d.conn;
}

static void pair_close(pair *p)
{
    rlb__conn_close(p->cli);
    rlb__conn_close(p->srv);
    rlb__listener_close(p->l);
    scratch_remove(&p->s);
}

/* Open fds of this process. */
/* close() of this program and of rlb_common, through -Wl,--wrap=close (ring.cmake). */
int __real_close(int fd);
int __wrap_close(int fd);

static int bad_closes; /* close() calls on an fd that was not open: double closes */

int __wrap_close(int fd)
{
    int rc = __real_close(fd);
    if (rc < 0 && errno == EBADF)
        __atomic_fetch_add(&bad_closes, 1, __ATOMIC_RELAXED);
    return rc;
}

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    assert_non_null(d);
    int n = 0;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

/* Entries of /dev/shm named like the shm_open fallback's segments ("rlb-<pid>-<n>") of
 * this process or of a process that no longer exists (a child that died holding one);
 * memfd segments never appear there at all. Entries of other live processes are other
 * tests' segments in flight, not leftovers. */
static int shm_leftovers(void)
{
    DIR *d = opendir("/dev/shm");
    if (!d)
        return 0; /* no /dev/shm: nothing can be left there */
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        int pid = rlb__shm_fallback_pid(e->d_name);
        if (pid > 0 && (pid == (int)getpid() || (kill(pid, 0) < 0 && errno == ESRCH)))
            n++;
    }
    closedir(d);
    return n;
}

/* Waits until *flag (a ring's `sleeping` word) reads 1. Returns 1, or 0 after WAIT_MS. */
static int wait_flag(uint32_t *flag)
{
    int64_t end = rlb__clock_ms() + WAIT_MS;
    while (rlb_load_acquire(flag) != 1) {
        if (rlb__clock_ms() > end)
            return 0;
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    return 1;
}

/* ---- A raw peer: the wire protocol written by hand, independent of conn.c ------------- */

static int raw_socket(void)
{
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    assert_true(s >= 0);
    return s;
}

static struct sockaddr_un raw_addr(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    assert_true(strlen(path) < sizeof(sa.sun_path));
    strcpy(sa.sun_path, path);
    return sa;
}

/* Connects to path; -1 with errno set when the kernel refuses. No cmocka asserts here: a
 * forked child calls it. */
static int raw_connect(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path) >= (int)sizeof(sa.sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s >= 0 && connect(s, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        int err = errno;
        close(s);
        errno = err;
        return -1;
    }
    return s;
}

/* One datagram with nfds fds attached. Returns what sendmsg returned. */
static ssize_t raw_send(int s, const void *msg, size_t len, const int *fds, int nfds)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * 8)];
    } ctl;
    struct iovec iov = {.iov_base = (void *)msg, .iov_len = len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > 0) {
        memset(&ctl, 0, sizeof(ctl));
        mh.msg_control = ctl.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
    }
    return sendmsg(s, &mh, MSG_NOSIGNAL);
}

/* Receives one datagram within WAIT_MS; the fds that came with it are counted in *nfds
 * and closed. Returns its length, 0 at end of stream, or -1. Child-safe (no asserts). */
static ssize_t raw_recv(int s, void *msg, size_t cap, int *nfds)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * 8)];
    } ctl;
    struct pollfd p = {.fd = s, .events = POLLIN};
    if (poll(&p, 1, WAIT_MS) != 1)
        return -1;
    struct iovec iov = {.iov_base = msg, .iov_len = cap};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                        .msg_controllen = sizeof(ctl.buf)};
    ssize_t n = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
    *nfds = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); n >= 0 && cm; cm = CMSG_NXTHDR(&mh, cm)) {
        for (size_t i = 0; i < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
            close(fd);
            (*nfds)++;
        }
    }
    return n;
}

static rlb__conn_hello hello(uint32_t abi, int32_t status, uint64_t ring_bytes)
{
    return (rlb__conn_hello){.magic = RLB_CONN_MAGIC, .abi_version = abi, .status = status,
                             .pid = (int32_t)getpid(), .ring_bytes = ring_bytes};
}

/* Sends a hello on a raw connection and reads the listener's refusal. Returns 0 when the
 * answer is a refusal with code `want` and no fds, else a code saying what differed.
 * Child-safe. */
static int raw_expect_refusal(int s, uint32_t abi, int want)
{
    rlb__conn_hello h = hello(abi, 0, 0);
    if (raw_send(s, &h, sizeof(h), NULL, 0) != (ssize_t)sizeof(h))
        return 1;
    int nfds;
    if (raw_recv(s, &h, sizeof(h), &nfds) != (ssize_t)sizeof(h))
        return 2;
    if (h.magic != RLB_CONN_MAGIC || h.abi_version != RLB_ABI_VERSION)
        return 3;
    if (h.status != want || nfds != 0)
        return 4;
    /* Then the listener hangs up. */
    return raw_recv(s, &h, sizeof(h), &nfds) == 0 ? 0 : 5;
}

/* ---- Socket directory ------------------------------------------------------------------ */

static void expect_path(const char *dir, const char *name)
{
    char buf[256], want[256];
    assert_int_equal(rlb__conn_socket_path(name, buf, sizeof(buf)), 0);
    snprintf(want, sizeof(want), "%s/%s", dir, name);
    assert_string_equal(buf, want);
    struct stat st;
    assert_int_equal(lstat(dir, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0700);
    assert_int_equal(st.st_uid, geteuid());
}

static void test_socket_dir(void **state)
{
    scratch s;
    scratch_make(&s);
    char dir[128], buf[256];
    snprintf(dir, sizeof(dir), "%s/run", s.dir);
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    char *saved_xdg = xdg ? strdup(xdg) : NULL;

    /* RLB_SOCKET_DIR names it; a missing directory is created 0700. */
    setenv("RLB_SOCKET_DIR", dir, 1);
    expect_path(dir, "bridge");
    expect_path(dir, "bridge"); /* and an existing good one is accepted */

    /* Refused: open to the group, open to others even for search, not a directory. */
    assert_int_equal(chmod(dir, 0750), 0);
    assert_int_equal(rlb__conn_socket_path("bridge", buf, sizeof(buf)), RLB_EPERM);
    assert_int_equal(chmod(dir, 0701), 0);
    assert_int_equal(rlb__conn_socket_path("bridge", buf, sizeof(buf)), RLB_EPERM);
    assert_int_equal(rmdir(dir), 0);
    assert_int_equal(symlink(s.dir, dir), 0); /* a link could be pointed elsewhere later */
    assert_int_equal(rlb__conn_socket_path("bridge", buf, sizeof(buf)), RLB_EPERM);
    assert_int_equal(unlink(dir), 0);
    if (geteuid() == 0) {
        assert_int_equal(mkdir(dir, 0700), 0);
        assert_int_equal(chown(dir, NOBODY, NOBODY), 0);
        assert_int_equal(rlb__conn_socket_path("bridge", buf, sizeof(buf)), RLB_EPERM);
        assert_int_equal(rmdir(dir), 0);
    }

    /* Bad names and a path that does not fit a socket address. */
    assert_int_equal(rlb__conn_socket_path("a/b", buf, sizeof(buf)), RLB_EINVAL);
    assert_int_equal(rlb__conn_socket_path("", buf, sizeof(buf)), RLB_EINVAL);
    char longname[120];
    memset(longname, 'x', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = 0;
    assert_int_equal(rlb__conn_socket_path(longname, buf, sizeof(buf)), RLB_ETOOBIG);
    assert_int_equal(rlb__conn_socket_path("bridge", buf, 8), RLB_ETOOBIG);
    assert_int_equal(rmdir(dir), 0);

    /* Without the knob: $XDG_RUNTIME_DIR/rlbridge. */
    unsetenv("RLB_SOCKET_DIR");
    setenv("XDG_RUNTIME_DIR", s.dir, 1);
    snprintf(dir, sizeof(dir), "%s/rlbridge", s.dir);
    expect_path(dir, "bridge");
    assert_int_equal(rmdir(dir), 0);

    if (saved_xdg)
        setenv("XDG_RUNTIME_DIR", saved_xdg, 1);
    else
        unsetenv("XDG_RUNTIME_DIR");
    free(saved_xdg);
    scratch_remove(&s);
}

/* ---- Listener paths -------------------------------------------------------------------- */

static void test_listener_paths(void **state)
{
    scratch s;
    scratch_make(&s);
    rlb_listener *l1, *l2;
    rlb_conn *c;
    struct stat st;

    /* Nobody there. */
    assert_int_equal(rlb__conn_connect(s.path, 100, &c), RLB_ENOTFOUND);
    assert_int_equal(rlb__conn_connect(s.path, 0, &c), RLB_EINVAL);
    /* Ring sizes that are not powers of two in range, a path too long for an address. */
    assert_int_equal(rlb__listener_open(s.path, 1000, &l1), RLB_EINVAL);
    assert_int_equal(rlb__listener_open(s.path, RLB_RING_MIN_CAPACITY / 2, &l1), RLB_EINVAL);
    char longpath[200];
    memset(longpath, 'x', sizeof(longpath) - 1);
    longpath[0] = '/';
    longpath[sizeof(longpath) - 1] = 0;
    assert_int_equal(rlb__listener_open(longpath, RING, &l1), RLB_ETOOBIG);

    /* A running listener keeps its path; closing removes the socket file. */
    assert_int_equal(rlb__listener_open(s.path, RING, &l1), 0);
    assert_int_equal(lstat(s.path, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(rlb__listener_accept(l1, &c), RLB_EAGAIN); /* nobody knocked */
    assert_int_equal(rlb__listener_open(s.path, RING, &l2), RLB_EEXIST);
    /* That open probed the path with a connect and hung up: the running listener sees a
     * peer that left, and goes on. */
    assert_int_equal(rlb__listener_accept(l1, &c), RLB_EPEERDEAD);
    assert_int_equal(rlb__listener_accept(l1, &c), RLB_EAGAIN);
    rlb__listener_close(l1);
    assert_int_equal(lstat(s.path, &st), -1);

    /* A stale socket left by a dead listener is replaced. */
    int raw = raw_socket();
    struct sockaddr_un sa = raw_addr(s.path);
    assert_int_equal(bind(raw, (struct sockaddr *)&sa, sizeof(sa)), 0);
    close(raw);
    assert_int_equal(lstat(s.path, &st), 0);
    assert_int_equal(rlb__listener_open(s.path, RING, &l1), 0);
    rlb__listener_close(l1);

    /* A file that is not a socket is not ours to replace. */
    int fd = open(s.path, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(rlb__listener_open(s.path, RING, &l1), RLB_EEXIST);
    assert_int_equal(lstat(s.path, &st), 0);
    assert_true(S_ISREG(st.st_mode));
    assert_int_equal(unlink(s.path), 0);

    /* Close removes only the file it bound: a newer listener's socket survives. */
    assert_int_equal(rlb__listener_open(s.path, RING, &l1), 0);
    assert_int_equal(unlink(s.path), 0);
    assert_int_equal(rlb__listener_open(s.path, RING, &l2), 0);
    rlb__listener_close(l1);
    assert_int_equal(lstat(s.path, &st), 0);
    rlb__listener_close(l2);
    assert_int_equal(lstat(s.path, &st), -1);
    scratch_remove(&s);
}

/* ---- Handshake and rings --------------------------------------------------------------- */

/* Sends len bytes of `fill` as one record through tx and checks they arrive whole on rx. */
static void through(rlb_ring *tx, rlb_ring *rx, uint32_t type, size_t len, uint8_t fill)
{
    void *slot;
    size_t cap;
    assert_int_equal(rlb__ring_claim(tx, len, 0, &slot, &cap), 0);
    memset(slot, fill, len);
    assert_int_equal(rlb__ring_commit(tx, type, len), 0);
    rlb_ring_msg m;
    assert_int_equal(rlb__ring_peek(rx, WAIT_MS, &m), 0);
    assert_int_equal(m.type, type);
    assert_int_equal(m.len, len);
    for (size_t i = 0; i < len; i++)
        assert_int_equal(((const uint8_t *)m.data)[i], fill);
    assert_int_equal(rlb__ring_release(rx), 0);
}

static void test_handshake(void **state)
{
    pair p;
    pair_make(&p);
    /* Both ends are this process, as SO_PEERCRED reports it. */
    assert_int_equal(rlb__conn_peer_pid(p.srv), getpid());
    assert_int_equal(rlb__conn_peer_pid(p.cli), getpid());
    assert_int_equal(rlb__conn_peer_uid(p.srv), geteuid());
    assert_int_equal(rlb__conn_peer_uid(p.cli), geteuid());
    assert_true(rlb__conn_peer_alive(p.srv));
    assert_true(rlb__conn_peer_alive(p.cli));
    assert_true(rlb__conn_fd(p.srv) >= 0 && rlb__conn_fd(p.cli) >= 0);

    /* Rings of the size the listener chose, one per direction. */
    assert_int_equal(rlb__ring_max_payload(rlb__conn_tx(p.srv)), RING / 2 - 16);
    assert_int_equal(rlb__ring_max_payload(rlb__conn_tx(p.cli)), RING / 2 - 16);
    through(rlb__conn_tx(p.srv), rlb__conn_rx(p.cli), 7, 100, 0xa1);
    through(rlb__conn_tx(p.cli), rlb__conn_rx(p.srv), 9, 3000, 0xb2);
    /* Nothing crossed the other way. */
    rlb_ring_msg m;
    assert_int_equal(rlb__ring_peek(rlb__conn_rx(p.srv), 0, &m), RLB_EAGAIN);
    assert_int_equal(rlb__ring_peek(rlb__conn_rx(p.cli), 0, &m), RLB_EAGAIN);
    /* The creator of both segments is the listener. */
    assert_int_equal(rlb__conn_rx(p.cli)->shm->creator_pid, getpid());

    /* The peer leaves: the listener learns at once from the socket, and its ring wait
     * ends without waiting out the timeout. */
    rlb__conn_close(p.cli);
    p.cli = NULL;
    assert_false(rlb__conn_peer_alive(p.srv));
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(rlb__ring_peek(rlb__conn_rx(p.srv), WAIT_MS, &m), RLB_EPEERDEAD);
    assert_true(rlb__clock_ms() - t0 < 1000);
    pair_close(&p);
}

/* ---- Memory ---------------------------------------------------------------------------- */

/* Dials path asking for rings of `ring` bytes while this thread accepts; returns what the
 * dialer got, with the listener's end in *srv (NULL on failure). */
static int dial_ring(rlb_listener *l, const char *path, uint64_t ring, rlb_conn **srv,
                     rlb_conn **cli)
{
    dialer d = {.path = path, .ring = ring};
    assert_int_equal(pthread_create(&d.thread, NULL, dial_thread, &d), 0);
    *srv = NULL;
    int acc = accept_within(l, srv);
    int rc = dial_finish(&d);
    *cli = rc == 0 ? d.conn : NULL;
    if (acc < 0 && rc == 0)
        rc = acc;
    return rc;
}

/* A peer gets rings no larger than it asks for, and the rings of all connections stay
 * within RLB_RING_TOTAL_BYTES: the peer past it is refused with RLB_ENOMEM, and room comes
 * back when a connection closes. */
static void test_ring_budget(void **state)
{
    scratch s;
    scratch_make(&s);
    rlb_listener *l;
    rlb_conn *srv[4], *cli[4];
    size_t big = rlb__ring_memsize(RING), small = rlb__ring_memsize(RLB_RING_MIN_CAPACITY);
    char cap[32];
    snprintf(cap, sizeof(cap), "%zu", 2 * (2 * big) + 2 * small);
    setenv("RLB_RING_TOTAL_BYTES", cap, 1);
    assert_int_equal(rlb__listener_open(s.path, RING, &l), 0);
    assert_int_equal(dial_ring(l, s.path, 0, &srv[0], &cli[0]), 0);
    assert_int_equal(dial_ring(l, s.path, 4 * RING, &srv[1], &cli[1]), 0); /* not larger */
    assert_int_equal(rlb__ring_max_payload(rlb__conn_rx(cli[1])), RING / 2 - 16);
    assert_int_equal(dial_ring(l, s.path, RLB_RING_MIN_CAPACITY, &srv[2], &cli[2]), 0);
    assert_int_equal(rlb__ring_max_payload(rlb__conn_rx(cli[2])),
                     RLB_RING_MIN_CAPACITY / 2 - 16);
    assert_int_equal(rlb__ring_max_payload(rlb__conn_tx(srv[2])),
                     RLB_RING_MIN_CAPACITY / 2 - 16);
    through(rlb__conn_tx(srv[2]), rlb__conn_rx(cli[2]), 5, RLB_RING_MIN_CAPACITY / 4, 0x3c);
    /* Full: one more of either size is refused, until a connection closes. */
    assert_int_equal(dial_ring(l, s.path, 0, &srv[3], &cli[3]), RLB_ENOMEM);
    assert_int_equal(dial_ring(l, s.path, RLB_RING_MIN_CAPACITY, &srv[3], &cli[3]),
                     RLB_ENOMEM);
    rlb__conn_close(cli[0]);
    rlb__conn_close(srv[0]);
    assert_int_equal(dial_ring(l, s.path, 0, &srv[0], &cli[0]), 0);
    for (int i = 0; i < 3; i++) {
        rlb__conn_close(cli[i]);
        rlb__conn_close(srv[i]);
    }
    unsetenv("RLB_RING_TOTAL_BYTES");
    rlb__listener_close(l);
    scratch_remove(&s);
}

/* More shared memory than the machine holds is refused before anything is reserved (a
 * reservation that large runs until the OOM killer ends the process), naming the limit. */
static void test_shm_room(void **state)
{
    char why[256];
    int fd = -1;
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(rlb__shm_room((size_t)1 << 50, 0, why, sizeof(why)), RLB_ENOMEM);
    assert_non_null(strstr(why, "more than"));
    assert_int_equal(rlb__shm_create((size_t)1 << 50, "test-huge", &fd), RLB_ENOMEM);
    assert_int_equal(rlb__shm_create_posix((size_t)1 << 50, &fd), RLB_ENOMEM);
    assert_int_equal(fd, -1);
    assert_true(rlb__clock_ms() - t0 < 1000);
    assert_int_equal(rlb__shm_room(1 << 20, 1, why, sizeof(why)), 0);
    assert_string_equal(why, "");
}

/* ---- fd passing ------------------------------------------------------------------------ */

static void test_fd_passing(void **state)
{
    pair p;
    pair_make(&p);
    int seg[3];
    for (int i = 0; i < 3; i++) {
        void *mem;
        assert_int_equal(rlb__shm_create(SEG_BYTES, "test-seg", &seg[i]), 0);
        assert_int_equal(rlb__shm_map(seg[i], SEG_BYTES, &mem), 0);
        memset(mem, 0x10 + i, SEG_BYTES);
        rlb__shm_unmap(mem, SEG_BYTES);
    }

    /* Three segments travel with one segment message; the receiver maps each and finds
     * the bytes the sender wrote. */
    rlb__seg_msg out = {.magic = RLB_SEG_MAGIC, .id = RLB_SEG_ID_WEIGHTS, .bytes = SEG_BYTES};
    assert_int_equal(rlb__conn_send_fds(p.cli, &out, sizeof(out), seg, 3), 0);
    rlb__seg_msg in;
    size_t len = 0;
    int fds[4];
    int nfds = 0;
    assert_int_equal(
        rlb__conn_recv_fds(p.srv, &in, sizeof(in), &len, fds, 4, &nfds, WAIT_MS), 0);
    assert_int_equal(len, sizeof(in));
    assert_int_equal(nfds, 3);
    assert_memory_equal(&in, &out, sizeof(in));
    for (int i = 0; i < 3; i++) {
        size_t size = 0;
        void *mem;
        assert_true(fcntl(fds[i], F_GETFD) & FD_CLOEXEC);
        assert_int_equal(rlb__shm_size(fds[i], &size), 0);
        assert_int_equal(size, SEG_BYTES);
        assert_int_equal(rlb__shm_map(fds[i], SEG_BYTES, &mem), 0);
        for (size_t k = 0; k < SEG_BYTES; k++)
            assert_int_equal(((uint8_t *)mem)[k], 0x10 + i);
        rlb__shm_unmap(mem, SEG_BYTES);
        close(fds[i]);
    }

    /* Nothing pending: RLB_EAGAIN without waiting, RLB_ETIMEDOUT after a wait. */
    assert_int_equal(rlb__conn_recv_fds(p.srv, &in, sizeof(in), &len, fds, 4, &nfds, 0),
                     RLB_EAGAIN);
    assert_int_equal(rlb__conn_recv_fds(p.srv, &in, sizeof(in), &len, fds, 4, &nfds, 50),
                     RLB_ETIMEDOUT);

    /* Over the receiver's limits (more fds, a longer message): dropped whole, and the fds
     * that arrived are closed rather than leaked. */
    int open_before = count_fds();
    assert_int_equal(rlb__conn_send_fds(p.cli, &out, sizeof(out), seg, 3), 0);
    assert_int_equal(
        rlb__conn_recv_fds(p.srv, &in, sizeof(in), &len, fds, 2, &nfds, WAIT_MS), RLB_ETOOBIG);
    char big[32] = {0};
    assert_int_equal(rlb__conn_send_fds(p.cli, big, sizeof(big), seg, 1), 0);
    assert_int_equal(
        rlb__conn_recv_fds(p.srv, &in, sizeof(in), &len, fds, 4, &nfds, WAIT_MS), RLB_ETOOBIG);
    assert_int_equal(count_fds(), open_before);
    /* A message without fds, received where none are expected. */
    assert_int_equal(rlb__conn_send_fds(p.cli, &out, sizeof(out), NULL, 0), 0);
    assert_int_equal(
        rlb__conn_recv_fds(p.srv, &in, sizeof(in), &len, NULL, 0, &nfds, WAIT_MS), 0);
    assert_int_equal(nfds, 0);

    /* Bad arguments. */
    static char huge[65537];
    assert_int_equal(rlb__conn_send_fds(p.cli, &out, 0, NULL, 0), RLB_EINVAL);
    assert_int_equal(rlb__conn_send_fds(p.cli, huge, sizeof(huge), NULL, 0), RLB_EINVAL);
    assert_int_equal(rlb__conn_send_fds(p.cli, &out, sizeof(out), seg, -1), RLB_EINVAL);
    assert_int_equal(rlb__conn_send_fds(p.cli, &out, sizeof(out), seg, RLB_CONN_MAX_FDS + 1),
                     RLB_EINVAL);
    assert_int_equal(rlb__conn_send_fds(p.cli, &out, sizeof(out), NULL, 1), RLB_EINVAL);
    assert_int_equal(rlb__conn_recv_fds(p.srv, &in, sizeof(in), &len, fds, 4, &nfds, -1),
                     RLB_EINVAL);
    assert_int_equal(rlb__conn_recv_fds(p.srv, &in, sizeof(in), &len, fds,
                                        RLB_CONN_MAX_FDS + 1, &nfds, 0),
                     RLB_EINVAL);

    /* The peer leaves: what it sent is still delivered, then RLB_EPEERDEAD both ways. */
    assert_int_equal(rlb__conn_send_fds(p.cli, &out, sizeof(out), seg, 1), 0);
    rlb__conn_close(p.cli);
    p.cli = NULL;
    assert_int_equal(
        rlb__conn_recv_fds(p.srv, &in, sizeof(in), &len, fds, 4, &nfds, WAIT_MS), 0);
    assert_int_equal(nfds, 1);
    close(fds[0]);
    assert_int_equal(
        rlb__conn_recv_fds(p.srv, &in, sizeof(in), &len, fds, 4, &nfds, WAIT_MS),
        RLB_EPEERDEAD);
    assert_int_equal(rlb__conn_send_fds(p.srv, &out, sizeof(out), NULL, 0), RLB_EPEERDEAD);
    for (int i = 0; i < 3; i++)
        close(seg[i]);
    pair_close(&p);
}

/* ---- Refusals by the listener ------------------------------------------------------------ */

static void test_listener_refuses(void **state)
{
    scratch s;
    scratch_make(&s);
    rlb_listener *l;
    rlb_conn *c = NULL;
    assert_int_equal(rlb__listener_open(s.path, RING, &l), 0);

    /* Another ABI version: refused with the reason, no fds, then a hang-up. */
    int raw = raw_connect(s.path);
    assert_true(raw >= 0);
    rlb__conn_hello h = hello(RLB_ABI_VERSION + 1, 0, 0);
    assert_int_equal(raw_send(raw, &h, sizeof(h), NULL, 0), sizeof(h));
    assert_int_equal(accept_within(l, &c), RLB_EVERSION);
    assert_null(c);
    int nfds;
    assert_int_equal(raw_recv(raw, &h, sizeof(h), &nfds), sizeof(h));
    assert_int_equal(h.status, RLB_EVERSION);
    assert_int_equal(h.abi_version, RLB_ABI_VERSION);
    assert_int_equal(nfds, 0);
    assert_int_equal(raw_recv(raw, &h, sizeof(h), &nfds), 0);
    close(raw);

    /* A malformed hello (5 bytes), and the wrong magic. */
    raw = raw_connect(s.path);
    assert_int_equal(raw_send(raw, "hello", 5, NULL, 0), 5);
    assert_int_equal(accept_within(l, &c), RLB_EPROTO);
    close(raw);
    raw = raw_connect(s.path);
    h = hello(RLB_ABI_VERSION, 0, 0);
    h.magic ^= 1;
    assert_int_equal(raw_send(raw, &h, sizeof(h), NULL, 0), sizeof(h));
    assert_int_equal(accept_within(l, &c), RLB_EPROTO);
    close(raw);

    /* A peer that never says hello: the handshake is bounded by RLB_PEER_TIMEOUT_MS; one
     * that hangs up instead is seen as gone. */
    setenv("RLB_PEER_TIMEOUT_MS", "100", 1);
    raw = raw_connect(s.path);
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(accept_within(l, &c), RLB_ETIMEDOUT);
    assert_true(rlb__clock_ms() - t0 < 2000);
    unsetenv("RLB_PEER_TIMEOUT_MS");
    close(raw);
    raw = raw_connect(s.path);
    close(raw);
    assert_int_equal(accept_within(l, &c), RLB_EPEERDEAD);

    /* None of that affected the listener: a proper peer gets in. */
    dialer d;
    dial_start(&d, s.path);
    assert_int_equal(accept_within(l, &c), 0);
    assert_int_equal(dial_finish(&d), 0);
    rlb__conn_close(d.conn);
    rlb__conn_close(c);
    rlb__listener_close(l);
    scratch_remove(&s);
}

/* ---- What the connecting side accepts ------------------------------------------------- */

typedef struct welcome_case {
    rlb__conn_hello reply; /* what the hand-written listener answers */
    size_t len;            /* bytes of it sent; 0 = all */
    int nfds;              /* segments it attaches */
    size_t seg_bytes;      /* their size */
    int init;              /* 1: lay out rings in them */
    int want;              /* what rlb__conn_connect must return */
    int wake;              /* 1: attach the four wake-up eventfds after the segments */
} welcome_case;

/* A listener written by hand answers one connect with w; returns what connect returned. */
static int fake_listener(const char *path, const welcome_case *w)
{
    int ls = raw_socket();
    struct sockaddr_un sa = raw_addr(path);
    assert_int_equal(bind(ls, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(ls, 1), 0);
    int open_before = count_fds();
    int bad_before = __atomic_load_n(&bad_closes, __ATOMIC_RELAXED);
    dialer d;
    dial_start(&d, path);
    int s = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    assert_true(s >= 0);
    /* The peer's hello: ours, from this process. */
    rlb__conn_hello h;
    int nfds;
    assert_int_equal(raw_recv(s, &h, sizeof(h), &nfds), sizeof(h));
    assert_int_equal(h.magic, RLB_CONN_MAGIC);
    assert_int_equal(h.abi_version, RLB_ABI_VERSION);
    assert_int_equal(h.status, 0);
    assert_int_equal(h.pid, getpid());
    assert_int_equal(nfds, 0);

    int segs[6];
    for (int i = 0; i < w->nfds; i++) {
        assert_int_equal(rlb__shm_create(w->seg_bytes, "test-fake", &segs[i]), 0);
        void *mem;
        assert_int_equal(rlb__shm_map(segs[i], w->seg_bytes, &mem), 0);
        if (w->init)
            assert_int_equal(rlb__ring_init(mem, RING), 0);
        rlb__shm_unmap(mem, w->seg_bytes);
    }
    int n = w->nfds;
    for (int i = 0; w->wake && i < 4; i++)
        assert_true((segs[n++] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) >= 0);
    size_t len = w->len ? w->len : sizeof(w->reply);
    assert_int_equal(raw_send(s, &w->reply, len, segs, n), (ssize_t)len);
    for (int i = 0; i < n; i++)
        close(segs[i]);
    int rc = dial_finish(&d);
    if (rc == 0)
        rlb__conn_close(d.conn);
    close(s);
    /* Whatever the outcome, the connecting side kept no fd and closed none twice. */
    assert_int_equal(count_fds(), open_before);
    assert_int_equal(__atomic_load_n(&bad_closes, __ATOMIC_RELAXED), bad_before);
    close(ls);
    assert_int_equal(unlink(path), 0);
    return rc;
}

static void test_connect_checks_welcome(void **state)
{
    scratch s;
    scratch_make(&s);
    size_t ring_mem = rlb__ring_memsize(RING);
    rlb__conn_hello bad_magic = hello(RLB_ABI_VERSION, 0, RING);
    bad_magic.magic ^= 1;
    const welcome_case cases[] = {
        /* A faithful welcome: the fake itself is right. */
        {hello(RLB_ABI_VERSION, 0, RING), 0, 2, ring_mem, 1, 0, 1},
        /* Another ABI version. */
        {hello(RLB_ABI_VERSION + 1, 0, RING), 0, 2, ring_mem, 1, RLB_EVERSION, 1},
        /* A refusal passes the listener's reason on; a code we do not know is malformed. */
        {hello(RLB_ABI_VERSION, RLB_ENOMEM, 0), 0, 0, 0, 0, RLB_ENOMEM, 0},
        {hello(RLB_ABI_VERSION, -1000, 0), 0, 0, 0, 0, RLB_EPROTO, 0},
        /* A welcome without its two segments or its eventfds, or announcing a ring size
         * that is not one. */
        {hello(RLB_ABI_VERSION, 0, RING), 0, 0, 0, 0, RLB_EPROTO, 0},
        {hello(RLB_ABI_VERSION, 0, RING), 0, 1, ring_mem, 1, RLB_EPROTO, 1},
        {hello(RLB_ABI_VERSION, 0, RING), 0, 2, ring_mem, 1, RLB_EPROTO, 0},
        {hello(RLB_ABI_VERSION, 0, 1000), 0, 2, ring_mem, 1, RLB_EPROTO, 1},
        /* Malformed welcomes carrying every fd: cut short, and with another magic. */
        {hello(RLB_ABI_VERSION, 0, RING), 5, 2, ring_mem, 1, RLB_EPROTO, 1},
        {bad_magic, 0, 2, ring_mem, 1, RLB_EPROTO, 1},
        /* Segments smaller than announced: never mapped past their end. */
        {hello(RLB_ABI_VERSION, 0, RING), 0, 2, ring_mem / 2, 0, RLB_EPROTO, 1},
        /* Segments of the right size holding no ring. */
        {hello(RLB_ABI_VERSION, 0, RING), 0, 2, ring_mem, 0, RLB_ECORRUPT, 1},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int rc = fake_listener(s.path, &cases[i]);
        if (rc != cases[i].want)
            fail_msg("case %zu: connect returned %s, want %s", i, rlb_strerror(rc),
                     rlb_strerror(cases[i].want));
    }
    scratch_remove(&s);
}

/* ---- kill -9 ------------------------------------------------------------------------- */

/* Child: connects, takes a segment of the shm_open fallback, then sends a message three
 * rings long, which blocks mid-message once the ring is full. Killed there by the parent. */
static void child_big_sender(const char *path)
{
    rlb_conn *c;
    int fd;
    if (rlb__conn_connect(path, WAIT_MS, &c) != 0)
        _exit(2);
    if (rlb__shm_create_posix(SEG_BYTES, &fd) != 0)
        _exit(3);
    size_t len = 3 * RING;
    uint8_t *buf = malloc(len);
    if (!buf)
        _exit(4);
    memset(buf, 0x5a, len);
    /* Returns only if the parent died first (its socket hangs up). */
    rlb__ring_send(rlb__conn_tx(c), 5, buf, len, 20000);
    _exit(5);
}

/* A child process connected to a listener of ours. */
typedef struct child_peer {
    scratch s;       /* where the listener lives */
    rlb_listener *l; /* the listener */
    rlb_conn *c;     /* our side of the child's connection */
    pid_t pid;       /* the child */
} child_peer;

/* Forks a child that runs body(path) (which never returns) and accepts its connection. */
static void child_peer_start(child_peer *cp, void (*body)(const char *path))
{
    scratch_make(&cp->s);
    assert_int_equal(rlb__listener_open(cp->s.path, RING, &cp->l), 0);
    cp->pid = fork();
    assert_true(cp->pid >= 0);
    if (cp->pid == 0)
        body(cp->s.path);
    assert_int_equal(accept_within(cp->l, &cp->c), 0);
}

/* Reaps the child, which must have died of SIGKILL, and closes everything. */
static void child_peer_end(child_peer *cp)
{
    int st;
    assert_int_equal(waitpid(cp->pid, &st, 0), cp->pid);
    assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
    rlb__conn_close(cp->c);
    rlb__listener_close(cp->l);
    scratch_remove(&cp->s);
}

typedef struct killer {
    pid_t pid;         /* the child to kill */
    uint32_t *asleep;  /* the parent's consumer `sleeping` word in the segment */
    int64_t killed_at; /* rlb__clock_ms() just before kill(SIGKILL); 0 if the parent never slept */
} killer;

/* Kills the child with -9 once the parent's consumer sleeps on its semaphore. */
static void *killer_thread(void *arg)
{
    killer *k = arg;
    if (wait_flag(k->asleep))
        k->killed_at = rlb__clock_ms();
    kill(k->pid, SIGKILL);
    return NULL;
}

static void test_kill_mid_message(void **state)
{
    int shm_before = shm_leftovers();
    child_peer cp;
    child_peer_start(&cp, child_big_sender);
    rlb_ring *rx = rlb__conn_rx(cp.c);

    /* The child fills the ring with the first fragments and sleeps for room: it is in
     * the middle of its message. Freeze it there, so that draining cannot let it finish.
     * Its shm_open segment exists by now and is already unlinked. */
    assert_true(wait_flag(&rx->shm->prod_wake.sleeping));
    int st;
    assert_int_equal(kill(cp.pid, SIGSTOP), 0);
    assert_int_equal(waitpid(cp.pid, &st, WUNTRACED), cp.pid);
    assert_true(WIFSTOPPED(st));
    assert_int_equal(shm_leftovers(), shm_before);

    /* We drain the fragments and fall asleep on the ring; the child dies meanwhile. */
    killer k = {.pid = cp.pid, .asleep = &rx->shm->cons_wake.sleeping};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, killer_thread, &k), 0);
    rlb_ring_rx rxs = {.max_msg = 1 << 20};
    rlb_ring_msg m;
    int rc = rlb__ring_recv(rx, &rxs, 20000, &m);
    int64_t learned_at = rlb__clock_ms();
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(rc, RLB_EPEERDEAD);
    assert_true(k.killed_at > 0);
    if (learned_at - k.killed_at >= 1000)
        fail_msg("learned of the death after %lld ms", (long long)(learned_at - k.killed_at));
    /* The partial message is discarded, and the next receive says the same. */
    assert_int_equal(rxs.have, 0);
    assert_int_equal(rxs.total, 0);
    assert_int_equal(rlb__ring_recv(rx, &rxs, WAIT_MS, &m), RLB_EPEERDEAD);
    assert_false(rlb__conn_peer_alive(cp.c));
    rlb__ring_rx_free(&rxs);
    child_peer_end(&cp);
    /* Nothing is left in /dev/shm after the kill. */
    assert_int_equal(shm_leftovers(), shm_before);
}

/* Child: connects, claims a slot and half fills it, says so over the socket, waits to be
 * killed. */
static void child_claimer(const char *path)
{
    rlb_conn *c;
    void *slot;
    size_t cap;
    if (rlb__conn_connect(path, WAIT_MS, &c) != 0 ||
        rlb__ring_claim(rlb__conn_tx(c), 100, 0, &slot, &cap) != 0)
        _exit(2);
    memset(slot, 0x33, 50);
    if (rlb__conn_send_fds(c, "x", 1, NULL, 0) != 0)
        _exit(3);
    /* Ends when the parent kills us, or hangs up (then the receive fails). */
    char b;
    size_t len;
    int nfds;
    rlb__conn_recv_fds(c, &b, 1, &len, NULL, 0, &nfds, 20000);
    _exit(4);
}

static void test_kill_open_claim(void **state)
{
    child_peer cp;
    child_peer_start(&cp, child_claimer);
    char b;
    size_t len;
    int nfds;
    assert_int_equal(rlb__conn_recv_fds(cp.c, &b, 1, &len, NULL, 0, &nfds, WAIT_MS), 0);
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(kill(cp.pid, SIGKILL), 0);
    rlb_ring_msg m;
    assert_int_equal(rlb__ring_peek(rlb__conn_rx(cp.c), 20000, &m), RLB_EPEERDEAD);
    assert_true(rlb__clock_ms() - t0 < 1000);
    /* The claim was never published. */
    assert_int_equal(rlb_load_acquire(&rlb__conn_rx(cp.c)->shm->prod.index), 0);
    child_peer_end(&cp);
}

/* ---- Another uid (`test_conn uid`, as root) ------------------------------------------- */

/* Drops to NOBODY for good. Returns 0 or -1. Child-safe. */
static int drop_to_nobody(void)
{
    if (setgroups(0, NULL) != 0 || setgid(NOBODY) != 0 || setuid(NOBODY) != 0)
        return -1;
    return geteuid() == NOBODY && getegid() == NOBODY ? 0 : -1;
}

/* A child's body: returns the child's exit code, 0 when it saw what the test expects. */
typedef int (*as_nobody_fn)(const char *path);

/* Forks a child that drops to NOBODY and exits with fn(path) (100: could not drop). */
static pid_t spawn_as_nobody(as_nobody_fn fn, const char *path)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
        _exit(drop_to_nobody() == 0 ? fn(path) : 100);
    return pid;
}

static int reap(pid_t pid)
{
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    return WEXITSTATUS(st);
}

static int nobody_connects(const char *path)
{
    rlb_conn *c;
    return rlb__conn_connect(path, WAIT_MS, &c) == RLB_EPERM ? 0 : 1;
}

static int nobody_says_raw_hello(const char *path)
{
    int s = raw_connect(path);
    if (s < 0)
        return 10;
    return raw_expect_refusal(s, RLB_ABI_VERSION, RLB_EPERM);
}

/* Runs fn as NOBODY against a listener of ours and returns what the listener's accept
 * said of that peer. opened: the test opens the socket directory and the socket to
 * everyone first (as a careless set-up would), so that the kernel lets the child in;
 * otherwise the directory stays 0700. */
static int accept_nobody(as_nobody_fn fn, int opened)
{
    scratch s;
    scratch_make(&s);
    rlb_listener *l;
    rlb_conn *c = NULL;
    int rc;
    assert_int_equal(rlb__listener_open(s.path, RING, &l), 0);
    if (opened) {
        assert_int_equal(chmod(s.dir, 0711), 0);
        assert_int_equal(chmod(s.path, 0666), 0);
        pid_t pid = spawn_as_nobody(fn, s.path);
        rc = accept_within(l, &c);
        assert_int_equal(reap(pid), 0);
    } else {
        /* Nothing can reach the listener, so the child is done before we look. */
        assert_int_equal(reap(spawn_as_nobody(fn, s.path)), 0);
        rc = rlb__listener_accept(l, &c);
    }
    assert_null(c);
    rlb__listener_close(l);
    scratch_remove(&s);
    return rc;
}

static void test_uid_stopped_by_dir(void **state)
{
    /* The socket directory is 0700 and ours: the kernel stops the other uid at the door
     * (connect: EACCES -> RLB_EPERM in the child) and the listener never sees it. */
    assert_int_equal(accept_nobody(nobody_connects, 0), RLB_EAGAIN);
}

static void test_uid_refused_by_listener(void **state)
{
    /* Let in by the kernel, a raw peer says hello: the listener's SO_PEERCRED check
     * refuses it with RLB_EPERM, and the child reads that reason. */
    assert_int_equal(accept_nobody(nobody_says_raw_hello, 1), RLB_EPERM);
}

static void test_uid_listener_refused_by_peer(void **state)
{
    /* Let in by the kernel, rlb__conn_connect in the child refuses the listener (uid 0
     * is not its own) with RLB_EPERM before saying hello: the listener sees a hang-up. */
    assert_int_equal(accept_nobody(nobody_connects, 1), RLB_EPEERDEAD);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "uid") == 0) {
        if (geteuid() != 0) {
            fprintf(stderr, "test_conn uid: needs root to run a peer as uid %d; skipped\n",
                    NOBODY);
            return 77;
        }
        pid_t pid = fork();
        if (pid == 0)
            _exit(drop_to_nobody() == 0 ? 0 : 100);
        int st;
        if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st)) {
            fprintf(stderr, "test_conn uid: cannot drop to uid %d here; skipped\n", NOBODY);
            return 77;
        }
        const struct CMUnitTest uid_tests[] = {
            cmocka_unit_test(test_uid_stopped_by_dir),
            cmocka_unit_test(test_uid_refused_by_listener),
            cmocka_unit_test(test_uid_listener_refused_by_peer),
        };
        return cmocka_run_group_tests(uid_tests, NULL, NULL);
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_socket_dir),
        cmocka_unit_test(test_listener_paths),
        cmocka_unit_test(test_handshake),
        cmocka_unit_test(test_fd_passing),
        cmocka_unit_test(test_ring_budget),
        cmocka_unit_test(test_shm_room),
        cmocka_unit_test(test_listener_refuses),
        cmocka_unit_test(test_connect_checks_welcome),
        cmocka_unit_test(test_kill_mid_message),
        cmocka_unit_test(test_kill_open_claim),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
