/* conn.c: listener, handshake, fd passing and liveness of conn.h. */
#include "common/conn.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common/atomics.h"
#include "common/check.h"
#include "common/clock.h"
#include "common/env.h"
#include "common/log.h"
#include "common/shm.h"
#include "rlb/rlb.h"

#define MAX_MSG 65536 /* largest message rlb__conn_send_fds sends */
#define N_WAKE 4      /* eventfds of a connection (enum below) */
#define N_WELCOME_FDS (2 + N_WAKE) /* a welcome carries the two rings and the eventfds */

/* The wake-up eventfds of a connection, in the order a welcome carries them: who sleeps on
 * each (the other side writes it). */
enum { WAKE_L_TX = 0, /* the listener, for room in ring 0 */
       WAKE_L_RX = 1, /* the listener, for data in ring 1 */
       WAKE_P_RX = 2, /* the peer, for data in ring 0 */
       WAKE_P_TX = 3  /* the peer, for room in ring 1 */ };

struct rlb_listener {
    int fd;           /* listening socket, non-blocking */
    char *path;       /* socket file, removed at close */
    dev_t dev;        /* identity of the socket file we bound, so close removes only it */
    ino_t ino;        /* (a newer listener may have replaced a file we lost) */
    uint64_t ring_bytes; /* capacity of each ring handed to a peer */
};

/* Bytes of ring segments this process's listeners hold for their connections, against
 * RLB_RING_TOTAL_BYTES (rlb_fetch_add: connections close on any thread). */
static uint64_t rings_held;

struct rlb_conn {
    int sock;        /* SOCK_SEQPACKET, blocking; the liveness channel */
    uint64_t held;   /* listener side: bytes of rings_held this connection counts */
    pid_t peer_pid;  /* SO_PEERCRED */
    uid_t peer_uid;  /* SO_PEERCRED */
    void *mem[2];    /* mappings of ring 0 (listener -> peer) and ring 1 (peer -> listener) */
    size_t mem_size; /* bytes of each mapping */
    rlb_ring tx;     /* the ring we produce into */
    rlb_ring rx;     /* the ring we consume from */
    int wake[N_WAKE]; /* eventfds the rings sleep on and signal (WAKE_*), -1 if none */
};

/* ---- Socket directory ---------------------------------------------------------------- */

/* Creates dir (0700) if missing and checks that only we can use it. */
static int check_dir(const char *dir)
{
    struct stat st;
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "cannot create socket directory %s: %s", dir,
                      strerror(errno));
        return RLB_EIO;
    }
    if (lstat(dir, &st) != 0) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "socket directory %s: %s", dir, strerror(errno));
        return RLB_EIO;
    }
    const char *why = !S_ISDIR(st.st_mode)        ? "is not a directory"
                      : st.st_uid != geteuid()    ? "is owned by another user"
                      : (st.st_mode & 077) != 0   ? "is open to group or others (want 0700)"
                                                  : NULL;
    if (why) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "refusing socket directory %s: it %s", dir, why);
        return RLB_EPERM;
    }
    return 0;
}

int rlb__conn_socket_path(const char *name, char *buf, size_t cap)
{
    if (!name || !*name || strchr(name, '/') || !buf)
        return RLB_EINVAL;
    char dir[PATH_MAX];
    const char *knob = rlb__env_str(RLB_KNOB_SOCKET_DIR);
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    int n = *knob               ? snprintf(dir, sizeof(dir), "%s", knob)
            : (xdg && *xdg)     ? snprintf(dir, sizeof(dir), "%s/rlbridge", xdg)
                                : snprintf(dir, sizeof(dir), "/tmp/rlbridge-%u",
                                           (unsigned)geteuid());
    if (n < 0 || (size_t)n >= sizeof(dir))
        return RLB_ETOOBIG;
    int rc = check_dir(dir);
    if (rc < 0)
        return rc;
    n = snprintf(buf, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap || (size_t)n >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "socket path %s/%s is too long", dir, name);
        return RLB_ETOOBIG;
    }
    return 0;
}

/* Fills a socket address for path. Returns 0 or RLB_ETOOBIG. */
static int make_addr(const char *path, struct sockaddr_un *sa)
{
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    if (!path || strlen(path) >= sizeof(sa->sun_path)) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "socket path too long: %s", path ? path : "(null)");
        return RLB_ETOOBIG;
    }
    strcpy(sa->sun_path, path);
    return 0;
}

/* ---- Messages with fds --------------------------------------------------------------- */

static void close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

static int sock_send(int sock, const void *msg, size_t len, const int *fds, int nfds)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * RLB_CONN_MAX_FDS)];
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
    ssize_t n;
    do {
        n = sendmsg(sock, &mh, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        int err = errno;
        if (err == EPIPE || err == ECONNRESET)
            return RLB_EPEERDEAD;
        RLB_LOG_ERROR(RLB_SUB_CONN, "sendmsg: %s", strerror(err));
        return RLB_EIO;
    }
    return 0;
}

/* Waits until sock is readable. Returns 0, RLB_EAGAIN (timeout 0), RLB_ETIMEDOUT,
 * RLB_EPEERDEAD or RLB_EIO. */
static int wait_readable(int sock, int timeout_ms)
{
    struct pollfd p = {.fd = sock, .events = POLLIN};
    int n;
    do {
        n = poll(&p, 1, timeout_ms);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "poll: %s", strerror(errno));
        return RLB_EIO;
    }
    if (n == 0)
        return timeout_ms == 0 ? RLB_EAGAIN : RLB_ETIMEDOUT;
    if (!(p.revents & POLLIN))
        return RLB_EPEERDEAD;
    return 0;
}

static int sock_recv(int sock, void *msg, size_t cap, size_t *len, int *fds, int max_fds,
                     int *nfds, int timeout_ms)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * RLB_CONN_MAX_FDS)];
    } ctl;
    int rc = wait_readable(sock, timeout_ms);
    if (rc < 0)
        return rc;
    struct iovec iov = {.iov_base = msg, .iov_len = cap};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
                        .msg_controllen = sizeof(ctl.buf)};
    ssize_t n;
    do {
        n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return timeout_ms == 0 ? RLB_EAGAIN : RLB_ETIMEDOUT;
        if (errno == ECONNRESET)
            return RLB_EPEERDEAD;
        RLB_LOG_ERROR(RLB_SUB_CONN, "recvmsg: %s", strerror(errno));
        return RLB_EIO;
    }
    /* Collect every fd that arrived, so that none leaks whatever we decide below. */
    int got[RLB_CONN_MAX_FDS];
    int ngot = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k && ngot < RLB_CONN_MAX_FDS; i++)
            memcpy(&got[ngot++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
    }
    if (n == 0 && ngot == 0)
        return RLB_EPEERDEAD;
    if ((mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || ngot > max_fds) {
        RLB_LOG_WARN(RLB_SUB_CONN, "dropping a message over the limits (%zd bytes of %zu, "
                     "%d fds of %d%s)", n, cap, ngot, max_fds,
                     (mh.msg_flags & MSG_CTRUNC) ? ", fds truncated" : "");
        close_fds(got, ngot);
        return RLB_ETOOBIG;
    }
    if (ngot > 0) /* fds may be NULL when none are expected */
        memcpy(fds, got, sizeof(int) * (size_t)ngot);
    *nfds = ngot;
    *len = (size_t)n;
    return 0;
}

/* ---- Connections --------------------------------------------------------------------- */

static int conn_alive(void *arg)
{
    return rlb__conn_peer_alive(arg);
}

int rlb__conn_peer_alive(const rlb_conn *c)
{
    struct pollfd p = {.fd = c->sock, .events = POLLRDHUP};
    if (poll(&p, 1, 0) < 0)
        return 1; /* EINTR / ENOMEM say nothing about the peer */
    return !(p.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL));
}

/* Maps the two ring segments (laying out empty rings first on the listener side) and
 * attaches our sides: the listener produces into ring 0 and consumes ring 1, the peer the
 * other way round. Wake-ups go through c->wake, never through the semaphores in the
 * segments: the peer may be any process of our uid, and a semaphore it scribbled over
 * would abort whoever posts it. */
static int attach_rings(rlb_conn *c, const int fds[2], uint64_t ring_bytes, int listener)
{
    c->mem_size = rlb__ring_memsize(ring_bytes);
    for (int i = 0; i < 2; i++) {
        int rc = rlb__shm_map(fds[i], c->mem_size, &c->mem[i]);
        /* Only a listener that sent a segment smaller than it announced gets here. */
        if (rc == RLB_EINVAL)
            return RLB_EPROTO;
        if (rc < 0)
            return rc;
        if (listener)
            RLB_CHECK(rlb__ring_init(c->mem[i], ring_bytes));
    }
    RLB_CHECK(rlb__ring_attach(&c->tx, c->mem[listener ? 0 : 1], c->mem_size,
                               RLB_RING_PRODUCER));
    RLB_CHECK(rlb__ring_attach(&c->rx, c->mem[listener ? 1 : 0], c->mem_size,
                               RLB_RING_CONSUMER));
    rlb__ring_set_liveness(&c->tx, conn_alive, c);
    rlb__ring_set_liveness(&c->rx, conn_alive, c);
    if (listener) {
        rlb__ring_set_wake_fds(&c->tx, c->wake[WAKE_L_TX], c->wake[WAKE_P_RX]);
        rlb__ring_set_wake_fds(&c->rx, c->wake[WAKE_L_RX], c->wake[WAKE_P_TX]);
    } else {
        rlb__ring_set_wake_fds(&c->tx, c->wake[WAKE_P_TX], c->wake[WAKE_L_RX]);
        rlb__ring_set_wake_fds(&c->rx, c->wake[WAKE_P_RX], c->wake[WAKE_L_TX]);
    }
    return 0;
}

static int peer_cred(int sock, struct ucred *cred)
{
    socklen_t len = sizeof(*cred);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, cred, &len) != 0) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "SO_PEERCRED: %s", strerror(errno));
        return RLB_EIO;
    }
    return 0;
}

static rlb_conn *conn_new(int sock, const struct ucred *cred)
{
    rlb_conn *c = calloc(1, sizeof(*c));
    if (c) {
        c->sock = sock;
        c->peer_pid = cred->pid;
        c->peer_uid = cred->uid;
        for (int i = 0; i < N_WAKE; i++)
            c->wake[i] = -1;
    }
    return c;
}

/* Creates the connection's wake-up eventfds (non-blocking, close-on-exec). */
static int make_wake_fds(rlb_conn *c)
{
    for (int i = 0; i < N_WAKE; i++) {
        c->wake[i] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (c->wake[i] < 0) {
            RLB_LOG_ERROR(RLB_SUB_CONN, "eventfd: %s", strerror(errno));
            return errno == EMFILE || errno == ENFILE ? RLB_ENOMEM : RLB_EIO;
        }
    }
    return 0;
}

/* Answers a refused peer with the reason, best effort. */
static void refuse(int sock, int status)
{
    rlb__conn_hello h = {.magic = RLB_CONN_MAGIC, .abi_version = RLB_ABI_VERSION,
                         .status = status, .pid = (int32_t)getpid()};
    sock_send(sock, &h, sizeof(h), NULL, 0);
}

/* Receives and checks a handshake message within timeout_ms (no fds expected unless
 * fds != NULL). */
static int recv_hello(int sock, rlb__conn_hello *h, int *fds, int *nfds, int timeout_ms)
{
    size_t len = 0;
    int none[RLB_CONN_MAX_FDS];
    int n = 0;
    int rc = sock_recv(sock, h, sizeof(*h), &len, fds ? fds : none, fds ? N_WELCOME_FDS : 0,
                       &n, timeout_ms);
    if (rc < 0)
        return rc;
    if (len != sizeof(*h) || h->magic != RLB_CONN_MAGIC) {
        RLB_LOG_WARN(RLB_SUB_CONN, "malformed handshake (%zu bytes)", len);
        close_fds(fds ? fds : none, n);
        return RLB_EPROTO; /* *nfds untouched: what arrived is closed already */
    }
    if (nfds)
        *nfds = n;
    return 0;
}

/* Listener side of the handshake on an accepted socket. */
static int welcome(rlb_listener *l, int sock, rlb_conn **out)
{
    struct ucred cred;
    rlb__conn_hello h;
    int fds[2] = {-1, -1};
    int rc = peer_cred(sock, &cred);
    if (rc < 0)
        return rc;
    /* The hello is read before any refusal: closing a socket with unread data resets it,
     * and the peer would see a hang-up instead of our reason. */
    rc = recv_hello(sock, &h, NULL, NULL, 0);
    if (rc == RLB_EAGAIN)
        return rc;
    if (rc < 0) {
        RLB_LOG_WARN(RLB_SUB_CONN, "peer pid %d: no valid hello: %s", (int)cred.pid,
                     rlb_strerror(rc));
        return rc;
    }
    if (cred.uid != geteuid()) {
        RLB_LOG_WARN(RLB_SUB_CONN, "refusing peer pid %d: uid %u is not ours (%u)",
                     (int)cred.pid, (unsigned)cred.uid, (unsigned)geteuid());
        refuse(sock, RLB_EPERM);
        return RLB_EPERM;
    }
    if (h.abi_version != RLB_ABI_VERSION) {
        RLB_LOG_WARN(RLB_SUB_CONN, "refusing peer pid %d: ABI version %u, ours %u",
                     (int)cred.pid, h.abi_version, RLB_ABI_VERSION);
        refuse(sock, RLB_EVERSION);
        return RLB_EVERSION;
    }
    /* A peer may ask for smaller rings (a tool: RLB_RING_TOOL_BYTES), never larger. */
    uint64_t ring_bytes = rlb__ring_memsize(h.ring_bytes) && h.ring_bytes < l->ring_bytes
                              ? h.ring_bytes
                              : l->ring_bytes;
    size_t size = rlb__ring_memsize(ring_bytes);
    uint64_t cap = (uint64_t)rlb__env_int(RLB_KNOB_RING_TOTAL_BYTES);
    if (rlb_fetch_add(&rings_held, 2 * size) + 2 * size > cap) {
        rlb_fetch_add(&rings_held, -(uint64_t)(2 * size));
        RLB_LOG_WARN(RLB_SUB_CONN, "refusing peer pid %d: its rings (2 x %zu bytes) would "
                     "pass RLB_RING_TOTAL_BYTES (%llu)", (int)cred.pid, size,
                     (unsigned long long)cap);
        refuse(sock, RLB_ENOMEM);
        return RLB_ENOMEM;
    }
    rlb_conn *c = conn_new(sock, &cred);
    if (!c) {
        rlb_fetch_add(&rings_held, -(uint64_t)(2 * size));
        return RLB_ENOMEM;
    }
    c->held = 2 * size;
    for (int i = 0; i < 2; i++) {
        RLB_CHECK_GOTO(rlb__shm_create(size, "rlb-ring", &fds[i]), rc, err);
    }
    RLB_CHECK_GOTO(make_wake_fds(c), rc, err);
    RLB_CHECK_GOTO(attach_rings(c, fds, ring_bytes, 1), rc, err);
    h = (rlb__conn_hello){.magic = RLB_CONN_MAGIC, .abi_version = RLB_ABI_VERSION,
                          .pid = (int32_t)getpid(), .ring_bytes = ring_bytes};
    int all[N_WELCOME_FDS] = {fds[0], fds[1]};
    memcpy(all + 2, c->wake, sizeof(c->wake));
    RLB_CHECK_GOTO(sock_send(sock, &h, sizeof(h), all, N_WELCOME_FDS), rc, err);
    close_fds(fds, 2);
    RLB_LOG_INFO(RLB_SUB_CONN, "peer pid %d connected (rings of %llu bytes)", (int)cred.pid,
                 (unsigned long long)ring_bytes);
    *out = c;
    return 0;
err:
    if (rc == RLB_ENOMEM)
        refuse(sock, RLB_ENOMEM);
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    c->sock = -1; /* the caller closes it */
    rlb__conn_close(c);
    return rc;
}

int rlb__listener_accept_sock(rlb_listener *l, int *sock)
{
    if (!l || !sock)
        return RLB_EINVAL;
    int s;
    do {
        s = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    } while (s < 0 && errno == EINTR);
    if (s < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED)
            return RLB_EAGAIN;
        RLB_LOG_ERROR(RLB_SUB_CONN, "accept: %s", strerror(errno));
        return errno == EMFILE || errno == ENFILE || errno == ENOMEM ? RLB_ENOMEM : RLB_EIO;
    }
    *sock = s;
    return 0;
}

int rlb__listener_welcome(rlb_listener *l, int sock, rlb_conn **out)
{
    if (!l || sock < 0 || !out)
        return RLB_EINVAL;
    return welcome(l, sock, out);
}

int rlb__listener_accept(rlb_listener *l, rlb_conn **out)
{
    if (!l || !out)
        return RLB_EINVAL;
    int sock;
    int rc = rlb__listener_accept_sock(l, &sock);
    if (rc < 0)
        return rc;
    rc = wait_readable(sock, (int)rlb__env_int(RLB_KNOB_PEER_TIMEOUT_MS));
    if (rc == 0)
        rc = welcome(l, sock, out);
    if (rc == RLB_EAGAIN) /* readable, yet no datagram: the peer hung up */
        rc = RLB_EPEERDEAD;
    if (rc < 0) {
        if (rc == RLB_ETIMEDOUT || rc == RLB_EPEERDEAD)
            RLB_LOG_WARN(RLB_SUB_CONN, "a peer sent no hello: %s", rlb_strerror(rc));
        close(sock);
    }
    return rc;
}

/* Is a listener answering at path? 1 yes, 0 no (stale file or nothing there). */
static int someone_listens(const struct sockaddr_un *sa)
{
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s < 0)
        return 0;
    int rc = connect(s, (const struct sockaddr *)sa, sizeof(*sa));
    int busy = rc == 0 || errno == EAGAIN;
    close(s);
    return busy;
}

int rlb__listener_open(const char *path, uint64_t ring_bytes, rlb_listener **out)
{
    if (!path || !out)
        return RLB_EINVAL;
    if (ring_bytes == 0)
        ring_bytes = (uint64_t)rlb__env_int(RLB_KNOB_RING_BYTES);
    if (rlb__ring_memsize(ring_bytes) == 0) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "ring size %llu is not a power of two in [%u, 2^40]",
                      (unsigned long long)ring_bytes, RLB_RING_MIN_CAPACITY);
        return RLB_EINVAL;
    }
    struct sockaddr_un sa;
    int rc = make_addr(path, &sa);
    if (rc < 0)
        return rc;
    rlb_listener *l = calloc(1, sizeof(*l));
    if (!l)
        return RLB_ENOMEM;
    l->ring_bytes = ring_bytes;
    l->path = strdup(path);
    l->fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    rc = RLB_ENOMEM;
    if (!l->path)
        goto err;
    RLB_SYSCHECK(l->fd, rc, err);
    /* The socket is bound and listening under a temporary name first and renamed into
     * place, so its path never exists without a listener behind it (a peer that connects
     * the moment the file appears is never refused). */
    struct sockaddr_un tmp;
    char tmp_path[sizeof(tmp.sun_path)];
    struct stat st;
    rc = RLB_EINVAL;
    if (snprintf(tmp_path, sizeof(tmp_path), "%s.%d.new", path, (int)getpid()) >=
            (int)sizeof(tmp_path) ||
        make_addr(tmp_path, &tmp) < 0) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "socket path %s is too long", path);
        goto err;
    }
    unlink(tmp_path); /* a leftover of a process with our pid */
    rc = RLB_EIO;
    RLB_SYSCHECK(bind(l->fd, (struct sockaddr *)&tmp, sizeof(tmp)), rc, err);
    /* The directory already keeps others out; the socket's own mode says the same. */
    RLB_SYSCHECK(chmod(tmp_path, 0600), rc, err_tmp);
    RLB_SYSCHECK(listen(l->fd, SOMAXCONN), rc, err_tmp);
    if (lstat(path, &st) == 0) {
        rc = RLB_EEXIST;
        if (!S_ISSOCK(st.st_mode) || someone_listens(&sa)) {
            RLB_LOG_ERROR(RLB_SUB_CONN, "%s: a listener is running there, or it is not a "
                          "socket", path);
            goto err_tmp;
        }
        RLB_LOG_INFO(RLB_SUB_CONN, "replacing stale socket %s", path);
    }
    rc = RLB_EIO;
    RLB_SYSCHECK(rename(tmp_path, path), rc, err_tmp);
    RLB_SYSCHECK(lstat(path, &st), rc, err_unlink);
    l->dev = st.st_dev;
    l->ino = st.st_ino;
    *out = l;
    return 0;
err_tmp:
    unlink(tmp_path);
    goto err;
err_unlink:
    unlink(path);
err:
    if (l->fd >= 0)
        close(l->fd);
    free(l->path);
    free(l);
    return rc;
}

int rlb__listener_fd(const rlb_listener *l)
{
    return l->fd;
}

void rlb__listener_close(rlb_listener *l)
{
    if (!l)
        return;
    struct stat st;
    if (lstat(l->path, &st) == 0 && st.st_dev == l->dev && st.st_ino == l->ino)
        unlink(l->path);
    close(l->fd);
    free(l->path);
    free(l);
}

int rlb__conn_connect(const char *path, int timeout_ms, rlb_conn **out)
{
    return rlb__conn_connect_abi(path, timeout_ms, 0, out, NULL);
}

int rlb__conn_connect_abi(const char *path, int timeout_ms, uint64_t ring_bytes,
                          rlb_conn **out, uint32_t *listener_abi)
{
    if (listener_abi)
        *listener_abi = 0;
    if (!path || !out || timeout_ms <= 0)
        return RLB_EINVAL;
    int64_t deadline = rlb__clock_ms() + timeout_ms;
    struct sockaddr_un sa;
    int rc = make_addr(path, &sa);
    if (rc < 0)
        return rc;
    int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    rlb_conn *c = NULL;
    int fds[N_WELCOME_FDS];
    int nfds = 0;
    RLB_SYSCHECK(sock, rc, err);
    /* Bounds connect() when the listener's backlog is full. */
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    RLB_SYSCHECK(setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)), rc, err);
    if (connect(sock, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        int err = errno;
        rc = err == ENOENT || err == ECONNREFUSED ? RLB_ENOTFOUND
             : err == EACCES || err == EPERM      ? RLB_EPERM
             : err == EAGAIN || err == ETIMEDOUT  ? RLB_ETIMEDOUT
                                                  : RLB_EIO;
        RLB_LOG_ERROR(RLB_SUB_CONN, "connect %s: %s", path, strerror(err));
        goto err;
    }
    struct ucred cred;
    RLB_CHECK_GOTO(peer_cred(sock, &cred), rc, err);
    if (cred.uid != geteuid()) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "refusing listener %s (pid %d): uid %u is not ours (%u)",
                      path, (int)cred.pid, (unsigned)cred.uid, (unsigned)geteuid());
        rc = RLB_EPERM;
        goto err;
    }
    rlb__conn_hello h = {.magic = RLB_CONN_MAGIC, .abi_version = RLB_ABI_VERSION,
                         .pid = (int32_t)getpid(), .ring_bytes = ring_bytes};
    rc = sock_send(sock, &h, sizeof(h), NULL, 0);
    /* A listener that refused us may have closed already; its reason still waits. */
    if (rc < 0 && rc != RLB_EPEERDEAD)
        goto err;
    int left_ms = (int)((deadline - rlb__clock_ms()) > 0 ? deadline - rlb__clock_ms() : 1);
    RLB_CHECK_GOTO(recv_hello(sock, &h, fds, &nfds, left_ms), rc, err);
    if (listener_abi)
        *listener_abi = h.abi_version; /* a refusal carries it too */
    rc = RLB_EPROTO;
    if (h.status < 0) {
        rc = h.status > -RLB_E_COUNT_ ? h.status : RLB_EPROTO;
        RLB_LOG_ERROR(RLB_SUB_CONN, "listener %s refused us: %s", path, rlb_strerror(rc));
        goto err;
    }
    if (h.abi_version != RLB_ABI_VERSION) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "listener %s speaks ABI %u, ours %u", path,
                      h.abi_version, RLB_ABI_VERSION);
        rc = RLB_EVERSION;
        goto err;
    }
    if (h.status != 0 || nfds != N_WELCOME_FDS || rlb__ring_memsize(h.ring_bytes) == 0) {
        RLB_LOG_ERROR(RLB_SUB_CONN, "listener %s: malformed welcome (%d fds, rings of %llu)",
                      path, nfds, (unsigned long long)h.ring_bytes);
        goto err;
    }
    rc = RLB_ENOMEM;
    c = conn_new(sock, &cred);
    if (!c)
        goto err;
    memcpy(c->wake, fds + 2, sizeof(c->wake)); /* c owns them from here */
    nfds = 2;
    RLB_CHECK_GOTO(attach_rings(c, fds, h.ring_bytes, 0), rc, err);
    close_fds(fds, 2);
    *out = c;
    return 0;
err:
    close_fds(fds, nfds);
    if (c)
        rlb__conn_close(c);
    else if (sock >= 0)
        close(sock);
    return rc;
}

int rlb__conn_fd(const rlb_conn *c)
{
    return c->sock;
}

void rlb__conn_wait_fds(const rlb_conn *c, int *rx_fd, int *tx_fd)
{
    *rx_fd = c->rx.wait_fd;
    *tx_fd = c->tx.wait_fd;
}

rlb_ring *rlb__conn_tx(rlb_conn *c)
{
    return &c->tx;
}

rlb_ring *rlb__conn_rx(rlb_conn *c)
{
    return &c->rx;
}

pid_t rlb__conn_peer_pid(const rlb_conn *c)
{
    return c->peer_pid;
}

uid_t rlb__conn_peer_uid(const rlb_conn *c)
{
    return c->peer_uid;
}

int rlb__conn_send_fds(rlb_conn *c, const void *msg, size_t len, const int *fds, int nfds)
{
    if (!c || !msg || len == 0 || len > MAX_MSG || nfds < 0 || nfds > RLB_CONN_MAX_FDS ||
        (nfds > 0 && !fds))
        return RLB_EINVAL;
    return sock_send(c->sock, msg, len, fds, nfds);
}

int rlb__conn_recv_fds(rlb_conn *c, void *msg, size_t cap, size_t *len, int *fds, int max_fds,
                       int *nfds, int timeout_ms)
{
    if (!c || !msg || cap == 0 || !len || !nfds || max_fds < 0 ||
        max_fds > RLB_CONN_MAX_FDS || (max_fds > 0 && !fds) || timeout_ms < 0)
        return RLB_EINVAL;
    return sock_recv(c->sock, msg, cap, len, fds, max_fds, nfds, timeout_ms);
}

void rlb__conn_close(rlb_conn *c)
{
    if (!c)
        return;
    rlb__ring_close(&c->tx);
    rlb__ring_close(&c->rx);
    for (int i = 0; i < 2; i++)
        rlb__shm_unmap(c->mem[i], c->mem_size);
    for (int i = 0; i < N_WAKE; i++)
        if (c->wake[i] >= 0)
            close(c->wake[i]);
    if (c->sock >= 0)
        close(c->sock);
    rlb_fetch_add(&rings_held, -c->held);
    free(c);
}
