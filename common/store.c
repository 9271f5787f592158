/* store.c: the rendezvous store (store.h): a server thread that polls its listening socket
 * and its connections, and a blocking client with bounded waits.
 *
 * The server keeps keys in a flat array (a job has a few dozen keys; a hash table would be
 * more code than the lookups cost). A connection's request is read into its own buffer as
 * bytes arrive, so a slow or hostile peer never blocks the others; a wait that cannot be
 * answered yet is parked on its connection with a deadline and answered when the key is set
 * or the deadline passes. Replies are small and written with a blocking send bounded by
 * SO_SNDTIMEO, so a peer that stops reading is dropped instead of stalling the thread.
 */
#include "common/store.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/check.h"
#include "common/clock.h"
#include "common/log.h"
#include "rlb/rlb.h"

#define STORE_MAGIC 0x53424c52u /* "RLBS" */
#define STORE_MAX_CONNS 256
#define STORE_SEND_TIMEOUT_MS 2000

enum { OP_HELLO = 1, OP_SET, OP_GET, OP_WAIT, OP_ADD };

typedef struct store_req_hdr {
    uint32_t magic;     /* STORE_MAGIC */
    uint8_t op;         /* OP_* */
    uint8_t pad[3];     /* zero */
    uint32_t key_len;   /* bytes of key after the header */
    uint32_t value_len; /* bytes of value after the key */
    int64_t arg;        /* add: delta; wait: timeout in ms */
} store_req_hdr;

typedef struct store_rep_hdr {
    int32_t status;     /* 0 or RLB_E* */
    uint32_t value_len; /* bytes of value after the header */
    int64_t num;        /* add: the new value */
} store_rep_hdr;

_Static_assert(sizeof(store_req_hdr) == 24, "store request header is a wire format");
_Static_assert(sizeof(store_rep_hdr) == 16, "store reply header is a wire format");

/* ---- server ------------------------------------------------------------------------- */

typedef struct store_kv {
    char *key;      /* NUL-terminated */
    uint8_t *value; /* value_len bytes (may be NULL when empty) */
    uint32_t value_len;
} store_kv;

typedef struct store_conn {
    int fd;             /* -1 = free slot */
    int hello;          /* said hello with our run id */
    uint8_t *buf;       /* the request being read: header, key, value */
    size_t have;        /* bytes of it read so far */
    size_t cap;         /* bytes allocated */
    int waiting;        /* a parked wait: buf holds it whole */
    int64_t deadline;   /* when the parked wait times out (CLOCK_MONOTONIC ms) */
    char key[RLB_STORE_KEY_MAX + 1]; /* the whole request's key, NUL-terminated */
} store_conn;

struct rlb_store_server {
    int listen_fd;                      /* the TCP listener */
    int wake[2];                        /* pipe: a byte in wake[0] stops the thread */
    int port;                           /* the port actually bound */
    char run_id[RLB_STORE_RUN_ID_MAX];  /* the job this store serves */
    pthread_t thread;                   /* the serving thread */
    store_kv *kv;                       /* keys set so far */
    size_t n_kv, cap_kv;                /* used and allocated entries of kv */
    store_conn conns[STORE_MAX_CONNS];  /* accepted connections */
};

static store_kv *kv_find(rlb_store_server *s, const char *key)
{
    for (size_t i = 0; i < s->n_kv; i++)
        if (!strcmp(s->kv[i].key, key))
            return &s->kv[i];
    return NULL;
}

/* Sets key to value; returns the entry or NULL without memory. */
static store_kv *kv_set(rlb_store_server *s, const char *key, const void *value, uint32_t len)
{
    uint8_t *copy = len ? malloc(len) : NULL;
    if (len && !copy)
        return NULL;
    if (len)
        memcpy(copy, value, len);
    store_kv *e = kv_find(s, key);
    if (!e) {
        if (s->n_kv == s->cap_kv) {
            size_t cap = s->cap_kv ? s->cap_kv * 2 : 64;
            store_kv *kv = realloc(s->kv, cap * sizeof(*kv));
            if (!kv)
                goto err;
            s->kv = kv;
            s->cap_kv = cap;
        }
        char *k = strdup(key);
        if (!k)
            goto err;
        e = &s->kv[s->n_kv++];
        *e = (store_kv){.key = k};
    }
    free(e->value);
    e->value = copy;
    e->value_len = len;
    return e;
err:
    free(copy);
    return NULL;
}

static void conn_drop(store_conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    free(c->buf);
    *c = (store_conn){.fd = -1};
}

/* Sends a reply; a peer that cannot take it is dropped. */
static void conn_reply(store_conn *c, int status, const void *value, uint32_t len, int64_t num)
{
    store_rep_hdr h = {.status = status, .value_len = len, .num = num};
    struct iovec iov[2] = {{&h, sizeof(h)}, {(void *)value, len}};
    struct msghdr m = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
    size_t want = sizeof(h) + len;
    ssize_t n;
    do {
        n = sendmsg(c->fd, &m, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n != (ssize_t)want) /* the reply is small: a short send means a peer not reading */
        conn_drop(c);
}

static const char *req_key(const store_conn *c)
{
    return c->key;
}

/* Answers a parked wait if its key is there or its deadline passed. */
static void wait_check(rlb_store_server *s, store_conn *c, int64_t now)
{
    store_kv *e = kv_find(s, req_key(c));
    if (e) {
        c->waiting = 0;
        c->have = 0;
        conn_reply(c, 0, e->value, e->value_len, 0);
    } else if (now >= c->deadline) {
        c->waiting = 0;
        c->have = 0;
        conn_reply(c, RLB_ETIMEDOUT, NULL, 0, 0);
    }
}

/* Serves the complete request in c->buf. */
static void serve(rlb_store_server *s, store_conn *c)
{
    store_req_hdr h;
    memcpy(&h, c->buf, sizeof(h));
    const char *key = req_key(c);
    const uint8_t *value = c->buf + sizeof(h) + h.key_len;
    if (h.op == OP_HELLO) {
        c->have = 0;
        if (strcmp(key, s->run_id)) {
            conn_reply(c, RLB_EPERM, s->run_id, (uint32_t)strlen(s->run_id), 0);
            return;
        }
        c->hello = 1;
        conn_reply(c, 0, NULL, 0, 0);
        return;
    }
    if (!c->hello) { /* a client of another job, or not a client at all */
        conn_drop(c);
        return;
    }
    store_kv *e;
    switch (h.op) {
    case OP_SET:
        c->have = 0;
        e = kv_set(s, key, value, h.value_len);
        conn_reply(c, e ? 0 : RLB_ENOMEM, NULL, 0, 0);
        for (int i = 0; e && i < STORE_MAX_CONNS; i++)
            if (s->conns[i].fd >= 0 && s->conns[i].waiting)
                wait_check(s, &s->conns[i], rlb__clock_ms());
        return;
    case OP_GET:
        c->have = 0;
        e = kv_find(s, key);
        conn_reply(c, e ? 0 : RLB_ENOTFOUND, e ? e->value : NULL, e ? e->value_len : 0, 0);
        return;
    case OP_WAIT:
        c->waiting = 1;
        c->deadline = rlb__clock_ms() + (h.arg > 0 ? h.arg : 0);
        wait_check(s, c, rlb__clock_ms());
        return;
    case OP_ADD: {
        c->have = 0;
        e = kv_find(s, key);
        char text[32];
        int64_t v = 0;
        if (e) {
            char *end;
            if (e->value_len == 0 || e->value_len >= sizeof(text)) {
                conn_reply(c, RLB_EPROTO, NULL, 0, 0);
                return;
            }
            memcpy(text, e->value, e->value_len);
            text[e->value_len] = 0;
            v = strtoll(text, &end, 10);
            if (*end) {
                conn_reply(c, RLB_EPROTO, NULL, 0, 0);
                return;
            }
        }
        v += h.arg;
        int n = snprintf(text, sizeof(text), "%lld", (long long)v);
        e = kv_set(s, key, text, (uint32_t)n);
        conn_reply(c, e ? 0 : RLB_ENOMEM, NULL, 0, v);
        for (int i = 0; e && i < STORE_MAX_CONNS; i++)
            if (s->conns[i].fd >= 0 && s->conns[i].waiting)
                wait_check(s, &s->conns[i], rlb__clock_ms());
        return;
    }
    default:
        conn_drop(c);
    }
}

/* Reads what the peer sent; serves a request once it is whole. */
static void conn_read(rlb_store_server *s, store_conn *c)
{
    if (c->waiting) { /* a client sends nothing while it waits: anything else is EOF */
        char b;
        if (recv(c->fd, &b, 1, MSG_DONTWAIT) == 0 || errno != EAGAIN)
            conn_drop(c);
        return;
    }
    store_req_hdr h = {0};
    size_t want = sizeof(h);
    if (c->have >= sizeof(h)) {
        memcpy(&h, c->buf, sizeof(h));
        want += (size_t)h.key_len + h.value_len;
    }
    if (want > c->cap) {
        uint8_t *b = realloc(c->buf, want);
        if (!b) {
            conn_drop(c);
            return;
        }
        c->buf = b;
        c->cap = want;
    }
    ssize_t n = recv(c->fd, c->buf + c->have, want - c->have, MSG_DONTWAIT);
    if (n <= 0) {
        if (n == 0 || (errno != EAGAIN && errno != EINTR))
            conn_drop(c);
        return;
    }
    c->have += (size_t)n;
    if (c->have == sizeof(h)) {
        memcpy(&h, c->buf, sizeof(h));
        if (h.magic != STORE_MAGIC || h.key_len == 0 || h.key_len > RLB_STORE_KEY_MAX ||
            h.value_len > RLB_STORE_VALUE_MAX || h.op < OP_HELLO || h.op > OP_ADD) {
            conn_drop(c);
            return;
        }
        want += (size_t)h.key_len + h.value_len;
    }
    if (c->have < want)
        return;
    if (memchr(c->buf + sizeof(h), 0, h.key_len)) {
        conn_drop(c); /* a NUL inside a key would make two keys look alike */
        return;
    }
    memcpy(c->key, c->buf + sizeof(h), h.key_len);
    c->key[h.key_len] = 0;
    serve(s, c);
}

static void server_accept(rlb_store_server *s)
{
    int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0)
        return;
    for (int i = 0; i < STORE_MAX_CONNS; i++) {
        if (s->conns[i].fd < 0) {
            int one = 1;
            struct timeval tv = {STORE_SEND_TIMEOUT_MS / 1000, 0};
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK); /* replies block, bounded */
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
            s->conns[i] = (store_conn){.fd = fd};
            return;
        }
    }
    RLB_LOG_WARN(RLB_SUB_LAUNCH, "store: %d connections already; refusing one",
                 STORE_MAX_CONNS);
    close(fd);
}

static void *server_main(void *arg)
{
    rlb_store_server *s = arg;
    struct pollfd pfd[STORE_MAX_CONNS + 2];
    int idx[STORE_MAX_CONNS + 2];
    for (;;) {
        int n = 0, timeout = -1;
        int64_t now = rlb__clock_ms();
        pfd[n++] = (struct pollfd){.fd = s->wake[0], .events = POLLIN};
        pfd[n++] = (struct pollfd){.fd = s->listen_fd, .events = POLLIN};
        for (int i = 0; i < STORE_MAX_CONNS; i++) {
            store_conn *c = &s->conns[i];
            if (c->fd < 0)
                continue;
            if (c->waiting) {
                int64_t left = c->deadline - now;
                int t = left < 0 ? 0 : left > 60000 ? 60000 : (int)left;
                timeout = timeout < 0 || t < timeout ? t : timeout;
            }
            idx[n] = i;
            pfd[n++] = (struct pollfd){.fd = c->fd, .events = POLLIN};
        }
        if (poll(pfd, (nfds_t)n, timeout) < 0 && errno != EINTR)
            break;
        if (pfd[0].revents)
            break;
        if (pfd[1].revents & POLLIN)
            server_accept(s);
        for (int j = 2; j < n; j++) {
            store_conn *c = &s->conns[idx[j]];
            if (c->fd == pfd[j].fd && pfd[j].revents)
                conn_read(s, c);
        }
        now = rlb__clock_ms();
        for (int i = 0; i < STORE_MAX_CONNS; i++)
            if (s->conns[i].fd >= 0 && s->conns[i].waiting)
                wait_check(s, &s->conns[i], now);
    }
    return NULL;
}

int rlb__store_resolve(const char *addr, int port, struct sockaddr_in *sa)
{
    *sa = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (!addr || !*addr)
        return RLB_EINVAL;
    if (inet_pton(AF_INET, addr, &sa->sin_addr) == 1)
        return 0;
    if (!strcmp(addr, "localhost")) {
        sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return 0;
    }
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int rc = getaddrinfo(addr, NULL, &hints, &res);
    if (rc != 0 || !res) {
        RLB_LOG_WARN(RLB_SUB_LAUNCH, "store address %s: %s", addr,
                     rc ? gai_strerror(rc) : "no IPv4 address");
        return RLB_EINVAL;
    }
    sa->sin_addr = ((const struct sockaddr_in *)res->ai_addr)->sin_addr;
    freeaddrinfo(res);
    return 0;
}

int rlb__store_server_start(const char *addr, int port, const char *run_id,
                            rlb_store_server **out)
{
    int rc = RLB_EINVAL;
    struct sockaddr_in sa;
    *out = NULL;
    if (!run_id || !*run_id || strlen(run_id) >= RLB_STORE_RUN_ID_MAX || port < 0 ||
        port > 65535 || rlb__store_resolve(addr, port, &sa) < 0)
        return RLB_EINVAL;
    rlb_store_server *s = calloc(1, sizeof(*s));
    if (!s)
        return RLB_ENOMEM;
    s->listen_fd = s->wake[0] = s->wake[1] = -1;
    for (int i = 0; i < STORE_MAX_CONNS; i++)
        s->conns[i].fd = -1;
    snprintf(s->run_id, sizeof(s->run_id), "%s", run_id);
    RLB_SYSCHECK(s->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), rc, err);
    int one = 1;
    setsockopt(s->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(s->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        rc = errno == EADDRINUSE ? RLB_EEXIST : errno == EADDRNOTAVAIL ? RLB_ENOTFOUND : RLB_EIO;
        RLB_LOG_DEBUG(RLB_SUB_LAUNCH, "store: bind %s:%d: %s", addr, port, strerror(errno));
        goto err;
    }
    RLB_SYSCHECK(listen(s->listen_fd, 128), rc, err);
    socklen_t sl = sizeof(sa);
    RLB_SYSCHECK(getsockname(s->listen_fd, (struct sockaddr *)&sa, &sl), rc, err);
    s->port = ntohs(sa.sin_port);
    RLB_SYSCHECK(pipe2(s->wake, O_CLOEXEC), rc, err);
    RLB_PTHREADCHECK(pthread_create(&s->thread, NULL, server_main, s), rc, err);
    *out = s;
    return 0;
err:
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    if (s->wake[0] >= 0) {
        close(s->wake[0]);
        close(s->wake[1]);
    }
    free(s);
    return rc;
}

int rlb__store_server_port(const rlb_store_server *s)
{
    return s->port;
}

void rlb__store_server_stop(rlb_store_server *s)
{
    if (!s)
        return;
    char b = 1;
    ssize_t n;
    do {
        n = write(s->wake[1], &b, 1);
    } while (n < 0 && errno == EINTR);
    pthread_join(s->thread, NULL);
    for (int i = 0; i < STORE_MAX_CONNS; i++)
        if (s->conns[i].fd >= 0)
            conn_drop(&s->conns[i]);
    for (size_t i = 0; i < s->n_kv; i++) {
        free(s->kv[i].key);
        free(s->kv[i].value);
    }
    free(s->kv);
    close(s->listen_fd);
    close(s->wake[0]);
    close(s->wake[1]);
    free(s);
}

/* ---- client ------------------------------------------------------------------------- */

struct rlb_store {
    int fd; /* the connection to the server */
};

/* Sends all of iov or returns RLB_EPEERDEAD. */
static int send_all(int fd, struct iovec *iov, int n)
{
    struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
    while (m.msg_iovlen) {
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return RLB_EPEERDEAD;
        while (m.msg_iovlen && (size_t)w >= m.msg_iov->iov_len) {
            w -= (ssize_t)m.msg_iov->iov_len;
            m.msg_iov++;
            m.msg_iovlen--;
        }
        if (m.msg_iovlen) {
            m.msg_iov->iov_base = (char *)m.msg_iov->iov_base + w;
            m.msg_iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* Receives len bytes by the deadline: 0, RLB_ETIMEDOUT or RLB_EPEERDEAD. */
static int recv_all(int fd, void *buf, size_t len, int64_t deadline)
{
    size_t got = 0;
    while (got < len) {
        int64_t left = deadline - rlb__clock_ms();
        if (left <= 0)
            return RLB_ETIMEDOUT;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)(left > 1000 ? 1000 : left));
        if (r < 0 && errno != EINTR)
            return RLB_EPEERDEAD;
        if (r <= 0)
            continue;
        ssize_t n = recv(fd, (char *)buf + got, len - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return RLB_EPEERDEAD;
        got += (size_t)n;
    }
    return 0;
}

/* One request and its reply. The reply's value goes to buf (cap bytes) and its length to
 * *len when they are not NULL; a longer value is drained and reported as RLB_ETOOBIG. */
static int request(rlb_store *s, int op, const char *key, const void *value, size_t vlen,
                   int64_t arg, int reply_ms, void *buf, size_t cap, size_t *len, int64_t *num)
{
    size_t klen = strlen(key);
    if (klen == 0 || klen > RLB_STORE_KEY_MAX || vlen > RLB_STORE_VALUE_MAX)
        return RLB_EINVAL;
    store_req_hdr h = {.magic = STORE_MAGIC, .op = (uint8_t)op, .key_len = (uint32_t)klen,
                       .value_len = (uint32_t)vlen, .arg = arg};
    struct iovec iov[3] = {{&h, sizeof(h)}, {(void *)key, klen}, {(void *)value, vlen}};
    RLB_CHECK(send_all(s->fd, iov, vlen ? 3 : 2));
    store_rep_hdr r;
    int64_t deadline = rlb__clock_ms() + reply_ms;
    RLB_CHECK(recv_all(s->fd, &r, sizeof(r), deadline));
    if (r.value_len > RLB_STORE_VALUE_MAX || (r.status > 0))
        return RLB_EPROTO;
    int rc = r.status;
    if (r.value_len > cap || !buf) {
        char sink[4096];
        for (size_t left = r.value_len; left;) {
            size_t n = left < sizeof(sink) ? left : sizeof(sink);
            RLB_CHECK(recv_all(s->fd, sink, n, deadline));
            left -= n;
        }
        if (rc == 0 && r.value_len && buf)
            rc = RLB_ETOOBIG;
    } else {
        RLB_CHECK(recv_all(s->fd, buf, r.value_len, deadline));
    }
    if (len)
        *len = r.value_len;
    if (num)
        *num = r.num;
    return rc;
}

#define STORE_REPLY_MS 10000 /* a live server answers anything but a wait at once */

int rlb__store_connect(const char *addr, int port, const char *run_id, int timeout_ms,
                       rlb_store **out, char *err, size_t errcap)
{
    struct sockaddr_in sa;
    char dummy[1];
    if (!err) {
        err = dummy;
        errcap = sizeof(dummy);
    }
    err[0] = 0;
    *out = NULL;
    if (!run_id || !*run_id || strlen(run_id) >= RLB_STORE_RUN_ID_MAX || port <= 0 ||
        port > 65535 || rlb__store_resolve(addr, port, &sa) < 0) {
        snprintf(err, errcap, "bad store address %s:%d or run id", addr, port);
        return RLB_EINVAL;
    }
    int64_t deadline = rlb__clock_ms() + timeout_ms;
    int fd = -1;
    for (;;) {
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            snprintf(err, errcap, "socket: %s", strerror(errno));
            return RLB_EIO;
        }
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            break;
        int e = errno;
        close(fd);
        if (rlb__clock_ms() >= deadline) {
            snprintf(err, errcap, "no rendezvous store at %s:%d after %d s (%s)", addr, port,
                     timeout_ms / 1000, strerror(e));
            return RLB_ETIMEDOUT;
        }
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    rlb_store *s = malloc(sizeof(*s));
    if (!s) {
        close(fd);
        return RLB_ENOMEM;
    }
    s->fd = fd;
    char other[RLB_STORE_RUN_ID_MAX];
    size_t olen = 0;
    int rc = request(s, OP_HELLO, run_id, NULL, 0, 0, 5000, other, sizeof(other) - 1, &olen,
                     NULL);
    if (rc == RLB_EPERM) {
        other[olen < sizeof(other) ? olen : sizeof(other) - 1] = 0;
        snprintf(err, errcap, "the store at %s:%d serves run id '%s', not '%s'", addr, port,
                 other, run_id);
    } else if (rc < 0) {
        snprintf(err, errcap, "%s:%d does not answer as a rendezvous store (%s)", addr, port,
                 rlb_strerror(rc));
        rc = RLB_EPROTO;
    }
    if (rc < 0) {
        rlb__store_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

int rlb__store_set(rlb_store *s, const char *key, const void *value, size_t len)
{
    return request(s, OP_SET, key, value, len, 0, STORE_REPLY_MS, NULL, 0, NULL, NULL);
}

int rlb__store_get(rlb_store *s, const char *key, void *buf, size_t cap, size_t *len)
{
    return request(s, OP_GET, key, NULL, 0, 0, STORE_REPLY_MS, buf, cap, len, NULL);
}

int rlb__store_wait(rlb_store *s, const char *key, int timeout_ms, void *buf, size_t cap,
                    size_t *len)
{
    if (timeout_ms < 0)
        return RLB_EINVAL;
    return request(s, OP_WAIT, key, NULL, 0, timeout_ms, timeout_ms + STORE_REPLY_MS, buf,
                   cap, len, NULL);
}

int rlb__store_add(rlb_store *s, const char *key, int64_t delta, int64_t *out)
{
    int64_t v = 0;
    int rc = request(s, OP_ADD, key, NULL, 0, delta, STORE_REPLY_MS, NULL, 0, NULL, &v);
    if (rc == 0 && out)
        *out = v;
    return rc;
}

void rlb__store_close(rlb_store *s)
{
    if (!s)
        return;
    close(s->fd);
    free(s);
}
