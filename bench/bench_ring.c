/* bench_ring: rlb-bench-ring, the shared-memory ring between two processes against an
 * AF_UNIX socketpair carrying the same messages in the same run.
 *
 *   64 B one-way latency   the child stamps CLOCK_MONOTONIC into a 64-byte message, the
 *                          parent reads the clock when the message is in its hands; the
 *                          next message goes only after an acknowledgement, so nothing
 *                          queues. Ring with a spinning consumer; ring with a sleeping
 *                          consumer (it sleeps on its semaphore at once, and the child sends
 *                          only once it announced the sleep: every sample is a wake-up);
 *                          socketpair (SOCK_STREAM, blocking reads). p50 and p99.
 *   64 B messages/s        a stream of 64-byte messages, claim/commit and peek/release on
 *                          the ring, one write() per message on the socket (the reader reads
 *                          64 KiB at a time), timed from the parent's "go" to the last one.
 *   4 MiB one message      (information) the 64 B latency run with 4 MiB messages, sent
 *                          with rlb__ring_send and received whole with rlb__ring_recv (or
 *                          write() / read()), one at a time: how long one large message
 *                          takes when nothing else is queued, where streaming lets the
 *                          receiver copy while the sender fills. Ring of RLB_RING_BYTES.
 *   4 MiB GB/s             4 MiB messages copied in by the sender (rlb__ring_send, which
 *                          streams them as fragments of RLB_RING_FRAG_BYTES) and copied out
 *                          by the receiver into its own buffer (rlb__ring_recv), against
 *                          write() / read() of the same buffers. Ring of RLB_RING_BYTES
 *                          (default 8 MiB), socket buffers left at their defaults.
 *   4 MiB in place         the same messages sent the same way, read where they lie: the
 *                          receiver takes each fragment with rlb__ring_recv_part and reads
 *                          every byte of it (a sum), without the reassembly copy. Same ring.
 * Each throughput figure is the best of 3 runs, ring and socketpair taking turns; both sides
 * of every run touch every byte of every message. A 4 MiB run first sends 4 messages that
 * are not timed, over either transport: a connection's ring, buffers and socket pay their
 * page faults once in its life, not per message (on this VM a fault is costly).
 *
 * 64 B latency runs spin without limit (the sleeping run: the receiver sleeps at once); the
 * other runs keep RLB_SPIN_US on both sides (spin, then sleep), as connections do.
 *
 * Ratios: latency_ratio_vs_socketpair = socketpair p50 / spinning ring p50;
 * ring_4m_vs_socketpair = ring GB/s (copy in, copy out) / socketpair GB/s;
 * ring_4m_inplace_vs_socketpair the same for the in-place run; ring_4m_oneway_vs_socketpair
 * = socketpair p50 / ring p50 of the 4 MiB one-message run. Every message carries a
 * sequence number the receiver checks. Targets on a 2-core machine: ring p50 <= 1 us
 * spinning, <= 30 us woken, >= 5 M msgs/s, latency ratio >= 5, 4 MiB ratio >= 1.5, in
 * place >= 2.
 * Prints a table, then one JSON line. Build: cmake --build BUILD --target rlb-bench-ring.
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/atomics.h"
#include "common/clock.h"
#include "common/env.h"
#include "common/ring.h"
#include "common/shm.h"
#include "rlb/rlb.h"

#define MSG 64                      /* small message size */
#define BIG (4u << 20)              /* large message size */
#define SMALL_RING (1u << 20)       /* ring of the latency and message-rate runs */
#define LAT_WARMUP 1000             /* latency samples dropped at the start */
#define LAT_SPIN_N 100000           /* samples, spinning ring */
#define LAT_WOKEN_N 5000            /* samples, sleeping ring */
#define LAT_SOCK_N 20000            /* samples, socketpair */
#define LAT_BIG_N 100               /* samples, 4 MiB one message at a time, each transport */
#define RATE_RING_N 2000000         /* 64 B messages, ring */
#define RATE_SOCK_N 500000          /* 64 B messages, socketpair */
#define BIG_N 100                   /* 4 MiB messages, each side */
#define BIG_WARM 4                  /* 4 MiB messages before the timed ones: two ring passes */
#define ROUNDS 3                    /* throughput runs of each kind; the best one counts */
#define SPIN_FOREVER_NS 10000000000 /* a spin that outlasts every wait here */
#define WAIT_MS 10000               /* bound on every wait: a stuck run fails, never hangs */
#define ASLEEP_SETTLE_NS 20000      /* after the consumer announced its sleep, let it block */

enum { ROLE_SENDER, ROLE_RECEIVER };
enum { T_DATA = 1, T_ACK = 2 };

static void die(const char *what, int rc)
{
    fprintf(stderr, "rlb-bench-ring: %s: %s\n", what, rc < 0 ? rlb_strerror(rc) : strerror(rc));
    exit(1);
}

/* ---- Two processes, two rings, one socketpair ------------------------------------------ */

/* Ring 0 carries sender -> receiver (the child sends, the parent receives and measures),
 * ring 1 the acknowledgements back. Each run forks a fresh child over fresh segments. */
typedef struct duo {
    uint64_t cap;   /* ring capacity */
    size_t size;    /* bytes of each segment */
    void *mem[2];   /* the two segments, mapped before the fork */
    int sock[2];    /* socketpair: [0] the parent's end, [1] the child's */
    rlb_ring tx;    /* this process's producer handle */
    rlb_ring rx;    /* this process's consumer handle */
} duo;

static void duo_open(duo *k, uint64_t cap)
{
    k->cap = cap;
    k->size = rlb__ring_memsize(cap);
    for (int i = 0; i < 2; i++) {
        int fd, rc = rlb__shm_create(k->size, "bench-ring", &fd);
        if (rc == 0)
            rc = rlb__shm_map(fd, k->size, &k->mem[i]);
        if (rc == 0)
            rc = rlb__ring_init(k->mem[i], cap);
        if (rc < 0)
            die("ring segment", rc);
        close(fd);
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, k->sock) != 0)
        die("socketpair", errno);
}

/* Attaches this process's two handles. spin_ns: how long either side spins before it
 * sleeps; < 0 keeps RLB_SPIN_US. */
static void duo_attach(duo *k, int role, int64_t spin_ns)
{
    int rc = rlb__ring_attach(&k->tx, k->mem[role == ROLE_SENDER ? 0 : 1], k->size,
                              RLB_RING_PRODUCER);
    if (rc == 0)
        rc = rlb__ring_attach(&k->rx, k->mem[role == ROLE_SENDER ? 1 : 0], k->size,
                              RLB_RING_CONSUMER);
    if (rc < 0)
        die("ring attach", rc);
    if (spin_ns >= 0) {
        k->tx.spin_ns = spin_ns;
        k->rx.spin_ns = spin_ns;
    }
    close(k->sock[role == ROLE_SENDER ? 0 : 1]);
}

static void duo_close(duo *k)
{
    for (int i = 0; i < 2; i++)
        rlb__shm_unmap(k->mem[i], k->size);
    close(k->sock[0]);
    close(k->sock[1]);
}

/* Runs child(k, arg) in a forked sender and parent(k, arg) here over fresh rings of cap
 * bytes, with the given spins (see duo_attach); waits for the child. */
typedef void (*side_fn)(duo *k, void *arg);

static void run_pair(uint64_t cap, int64_t send_spin_ns, int64_t recv_spin_ns, side_fn child,
                     side_fn parent, void *arg)
{
    duo k = {0};
    duo_open(&k, cap);
    pid_t pid = fork();
    if (pid < 0)
        die("fork", errno);
    if (pid == 0) {
        duo_attach(&k, ROLE_SENDER, send_spin_ns);
        child(&k, arg);
        _exit(0);
    }
    duo_attach(&k, ROLE_RECEIVER, recv_spin_ns);
    parent(&k, arg);
    int st;
    if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        die("sender process failed", EIO);
    rlb__ring_close(&k.tx);
    rlb__ring_close(&k.rx);
    duo_close(&k);
}

/* ---- Ring and socket primitives --------------------------------------------------------- */

static void ring_put(rlb_ring *r, uint32_t type, const void *buf, size_t len)
{
    void *slot;
    size_t cap;
    int rc = rlb__ring_claim(r, len, WAIT_MS, &slot, &cap);
    if (rc < 0)
        die("claim", rc);
    memcpy(slot, buf, len);
    rlb__ring_commit(r, type, len);
}

/* Sends a message of len bytes: a MSG through claim, fill, commit; a larger one through
 * rlb__ring_send, which streams it as fragments. */
static void ring_send(rlb_ring *r, const void *buf, size_t len)
{
    if (len == MSG) {
        ring_put(r, T_DATA, buf, len);
        return;
    }
    int rc = rlb__ring_send(r, T_DATA, buf, len, WAIT_MS);
    if (rc < 0)
        die("send", rc);
}

/* Peeks the next record and copies its first 8 bytes (a stamp or a count) out. */
static uint64_t ring_take(rlb_ring *r)
{
    rlb_ring_msg m;
    uint64_t v = 0;
    int rc = rlb__ring_peek(r, WAIT_MS, &m);
    if (rc < 0)
        die("peek", rc);
    memcpy(&v, m.data, m.len < sizeof(v) ? m.len : sizeof(v));
    rlb__ring_release(r);
    return v;
}

static void sock_write(int s, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = write(s, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("socket write", n < 0 ? errno : EPIPE);
        p += n;
        len -= (size_t)n;
    }
}

static void sock_read(int s, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = read(s, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("socket read", n < 0 ? errno : EPIPE);
        p += n;
        len -= (size_t)n;
    }
}

/* ---- Latency ---------------------------------------------------------------------------- */

typedef struct lat_run {
    int socket;      /* 1: over the socketpair */
    int woken;       /* 1: the receiver sleeps before every message */
    size_t len;      /* message size: MSG, or BIG (rlb__ring_send / rlb__ring_recv) */
    int warm;        /* samples dropped at the start */
    int n;           /* samples kept */
    uint8_t *buf;    /* len bytes: the child's message, the parent's copy of it */
    rlb_ring_rx rx;  /* parent, BIG: reassembly state */
    double *lat_ns;  /* the parent's samples */
} lat_run;

static void lat_child(duo *k, void *arg)
{
    lat_run *L = arg;
    uint8_t *msg = L->buf;
    uint64_t ack;
    rlb__ring_shared *to = k->mem[0];
    for (int i = 0; i < L->warm + L->n; i++) {
        if (L->woken) {
            /* Pairs with the exchange in the receiver's sleep: it announced the sleep. */
            int64_t end = rlb__clock_ns() + (int64_t)WAIT_MS * 1000000;
            while (!rlb_load_acquire(&to->cons_wake.sleeping))
                if (rlb__clock_ns() > end)
                    die("receiver never slept", ETIMEDOUT);
            int64_t settle = rlb__clock_ns() + ASLEEP_SETTLE_NS;
            while (rlb__clock_ns() < settle)
                rlb_cpu_relax();
        }
        int64_t t = rlb__clock_ns();
        memcpy(msg, &t, sizeof(t));
        if (L->socket) {
            sock_write(k->sock[1], msg, L->len);
            sock_read(k->sock[1], &ack, sizeof(ack));
        } else {
            ring_send(&k->tx, msg, L->len);
            ring_take(&k->rx);
        }
    }
}

/* Receives one latency sample's message whole (a BIG one copied out of the ring into
 * L->buf, or reassembled) and returns the stamp it carries. */
static int64_t lat_receive(duo *k, lat_run *L)
{
    int64_t sent;
    if (L->socket) {
        sock_read(k->sock[0], L->buf, L->len);
        memcpy(&sent, L->buf, sizeof(sent));
    } else if (L->len == MSG) {
        rlb_ring_msg m;
        int rc = rlb__ring_peek(&k->rx, WAIT_MS, &m);
        if (rc < 0)
            die("peek", rc);
        memcpy(&sent, m.data, sizeof(sent));
    } else {
        rlb_ring_msg m;
        int rc = rlb__ring_recv(&k->rx, &L->rx, WAIT_MS, &m);
        if (rc < 0)
            die("recv", rc);
        if (m.data != L->rx.buf)
            memcpy(L->buf, m.data, m.len);
        memcpy(&sent, m.data, sizeof(sent));
    }
    return sent;
}

static void lat_parent(duo *k, void *arg)
{
    lat_run *L = arg;
    uint64_t ack = 0;
    for (int i = 0; i < L->warm + L->n; i++) {
        int64_t sent = lat_receive(k, L);
        int64_t got = rlb__clock_ns();
        if (!L->socket && L->len == MSG)
            rlb__ring_release(&k->rx);
        if (i >= L->warm)
            L->lat_ns[i - L->warm] = (double)(got - sent);
        if (L->socket)
            sock_write(k->sock[0], &ack, sizeof(ack));
        else
            ring_put(&k->tx, T_ACK, &ack, sizeof(ack));
    }
    rlb__ring_recv_done(&k->rx, &L->rx);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Measures one latency run of messages of len bytes (MSG over a SMALL_RING, spinning
 * without limit; BIG over a ring of cap bytes, keeping RLB_SPIN_US); p50 and p99 in
 * microseconds. */
static void latency(int socket, int woken, size_t len, int n, uint64_t cap, double *p50,
                    double *p99)
{
    lat_run L = {.socket = socket,
                 .woken = woken,
                 .len = len,
                 .warm = len == MSG ? LAT_WARMUP : BIG_WARM,
                 .n = n,
                 .buf = calloc(1, len),
                 .rx = {.max_msg = len},
                 .lat_ns = calloc((size_t)n, 8)};
    if (!L.lat_ns || !L.buf)
        die("calloc", ENOMEM);
    int64_t spin = len == MSG ? SPIN_FOREVER_NS : -1;
    run_pair(len == MSG ? SMALL_RING : cap, spin, woken ? 0 : spin, lat_child, lat_parent, &L);
    qsort(L.lat_ns, (size_t)n, sizeof(double), cmp_double);
    *p50 = L.lat_ns[n / 2] / 1e3;
    *p99 = L.lat_ns[(size_t)n * 99 / 100] / 1e3;
    rlb__ring_rx_free(&L.rx);
    free(L.buf);
    free(L.lat_ns);
}

/* ---- Throughput -------------------------------------------------------------------------- */

/* How a throughput run moves its messages. */
enum {
    VIA_SOCKET,   /* write() / read() on the socketpair */
    VIA_RING,     /* 4 MiB: rlb__ring_send / rlb__ring_recv, then copied out of the record
                     when it was not reassembled; 64 B: claim, fill, commit / peek, release */
    VIA_IN_PLACE, /* 4 MiB: rlb__ring_send / rlb__ring_recv_part, every byte read in place */
};

typedef struct rate_run {
    int via;        /* VIA_* */
    size_t len;     /* message size */
    long n;         /* messages timed */
    long warm;      /* messages sent before "go", not timed */
    uint8_t *buf;   /* sender: source; receiver: destination (len bytes, touched) */
    rlb_ring_rx rx; /* receiver: reassembly state, kept from the warm-up to the timed run */
    double seconds; /* parent: from "go" to the last message in hand */
} rate_run;

/* Sends messages 0..n-1 (the sequence number leads each). */
static void send_msgs(duo *k, rate_run *R, long n)
{
    for (long i = 0; i < n; i++) {
        uint64_t seq = (uint64_t)i;
        memcpy(R->buf, &seq, sizeof(seq));
        if (R->via == VIA_SOCKET)
            sock_write(k->sock[1], R->buf, R->len);
        else
            ring_send(&k->tx, R->buf, R->len);
    }
}

static void rate_child(duo *k, void *arg)
{
    rate_run *R = arg;
    send_msgs(k, R, R->warm);
    uint64_t go;
    if (R->via == VIA_SOCKET)
        sock_read(k->sock[1], &go, sizeof(go));
    else
        ring_take(&k->rx);
    send_msgs(k, R, R->n);
}

static void check_seq(uint64_t got, long want)
{
    if (got != (uint64_t)want)
        die("message out of order or corrupt", EPROTO);
}

/* Receiver loops, one per transport and size, for messages 0..n-1. Each checks every
 * sequence number. */
typedef void (*recv_fn)(duo *k, rate_run *R, long n);

static void recv_ring_small(duo *k, rate_run *R, long n)
{
    for (long i = 0; i < n; i++)
        check_seq(ring_take(&k->rx), i);
}

static void recv_sock_small(duo *k, rate_run *R, long n)
{
    /* Read in 64 KiB gulps, as a stream reader would; a gulp that ends inside a message
     * is completed before its messages are checked. */
    static uint8_t gulp[1 << 16];
    (void)R;
    for (long i = 0; i < n;) {
        ssize_t got = read(k->sock[0], gulp, sizeof(gulp));
        if (got <= 0)
            die("socket read", got < 0 ? errno : EPIPE);
        size_t whole = ((size_t)got + MSG - 1) / MSG * MSG;
        sock_read(k->sock[0], gulp + got, whole - (size_t)got);
        for (size_t off = 0; off < whole; off += MSG, i++) {
            uint64_t seq;
            memcpy(&seq, gulp + off, sizeof(seq));
            check_seq(seq, i);
        }
    }
}

static void recv_ring_big(duo *k, rate_run *R, long n)
{
    for (long i = 0; i < n; i++) {
        rlb_ring_msg m;
        int rc = rlb__ring_recv(&k->rx, &R->rx, WAIT_MS, &m);
        if (rc < 0)
            die("recv", rc);
        if (m.len != R->len)
            die("message of the wrong size", EPROTO);
        /* A fragmented message was already copied out, into the reassembly buffer. */
        if (m.data != R->rx.buf)
            memcpy(R->buf, m.data, m.len);
        uint64_t seq;
        memcpy(&seq, m.data, sizeof(seq));
        check_seq(seq, i);
    }
    rlb__ring_recv_done(&k->rx, &R->rx);
}

/* Reads every byte of p[0..len): the sum of its 64-bit words, 64 bytes at a time into four
 * 16-byte vector sums (independent, so the loads overlap; a scalar loop the compiler does
 * not vectorize at -O2 reads at a third of memcpy's speed and would measure itself, not
 * the ring), then of the tail bytes. */
typedef uint64_t sum_vec __attribute__((vector_size(16)));

static uint64_t sum_bytes(const uint8_t *p, size_t len)
{
    sum_vec s[4] = {{0}};
    size_t i = 0;
    for (; i + sizeof(s) <= len; i += sizeof(s))
        for (int j = 0; j < 4; j++) {
            sum_vec w;
            memcpy(&w, p + i + j * sizeof(w), sizeof(w));
            s[j] += w;
        }
    sum_vec t = s[0] + s[1] + s[2] + s[3];
    uint64_t sum = t[0] + t[1];
    for (; i < len; i++)
        sum += p[i];
    return sum;
}

static void recv_ring_in_place(duo *k, rate_run *R, long n)
{
    uint64_t sum = 0;
    for (long i = 0; i < n; i++) {
        rlb_ring_part p;
        do {
            int rc = rlb__ring_recv_part(&k->rx, &R->rx, WAIT_MS, &p);
            if (rc < 0)
                die("recv part", rc);
            if (p.total != R->len || (p.off == 0 && p.len < sizeof(uint64_t)))
                die("message of the wrong size", EPROTO);
            if (p.off == 0) {
                uint64_t seq;
                memcpy(&seq, p.data, sizeof(seq));
                check_seq(seq, i);
            }
            sum += sum_bytes(p.data, p.len);
        } while (!p.last);
    }
    rlb__ring_recv_done(&k->rx, &R->rx);
    /* The sum of what every message holds: the read pass cannot be optimized away. */
    if (n && sum == 0)
        die("messages read as zeros", EPROTO);
}

static void recv_sock_big(duo *k, rate_run *R, long n)
{
    for (long i = 0; i < n; i++) {
        sock_read(k->sock[0], R->buf, R->len);
        uint64_t seq;
        memcpy(&seq, R->buf, sizeof(seq));
        check_seq(seq, i);
    }
}

static void rate_parent(duo *k, void *arg)
{
    rate_run *R = arg;
    recv_fn recv = R->via == VIA_SOCKET     ? (R->len == MSG ? recv_sock_small : recv_sock_big)
                   : R->via == VIA_IN_PLACE ? recv_ring_in_place
                   : R->len == MSG          ? recv_ring_small
                                            : recv_ring_big;
    recv(k, R, R->warm);
    uint64_t go = 0;
    int64_t t0 = rlb__clock_ns();
    if (R->via == VIA_SOCKET)
        sock_write(k->sock[0], &go, sizeof(go));
    else
        ring_put(&k->tx, T_ACK, &go, sizeof(go));
    recv(k, R, R->n);
    R->seconds = (double)(rlb__clock_ns() - t0) / 1e9;
}

/* Messages per second over one transport, after `warm` untimed ones. */
static double rate(int via, size_t len, long n, long warm, uint64_t cap)
{
    rate_run R = {.via = via,
                  .len = len,
                  .n = n,
                  .warm = warm,
                  .buf = malloc(len),
                  .rx = {.max_msg = len}};
    if (!R.buf)
        die("malloc", ENOMEM);
    memset(R.buf, 0x5a, len); /* touched before the fork, and again by the warm-up */
    run_pair(cap, -1, -1, rate_child, rate_parent, &R);
    rlb__ring_rx_free(&R.rx);
    free(R.buf);
    return (double)n / R.seconds;
}

int main(void)
{
    uint64_t big_ring = (uint64_t)rlb__env_int(RLB_KNOB_RING_BYTES);
    if (rlb__ring_memsize(big_ring) == 0)
        die("RLB_RING_BYTES is not a valid ring size", EINVAL);
    double spin50, spin99, woken50, woken99, sock50, sock99, big50, big99, sbig50, sbig99;
    latency(0, 0, MSG, LAT_SPIN_N, 0, &spin50, &spin99);
    latency(0, 1, MSG, LAT_WOKEN_N, 0, &woken50, &woken99);
    latency(1, 0, MSG, LAT_SOCK_N, 0, &sock50, &sock99);
    latency(0, 0, BIG, LAT_BIG_N, big_ring, &big50, &big99);
    latency(1, 0, BIG, LAT_BIG_N, big_ring, &sbig50, &sbig99);
    /* Throughput: best of ROUNDS, the two transports taking turns, so that a burst of
     * load from elsewhere on the machine does not land on one of them only. */
    double ring_rate = 0, sock_rate = 0, ring_gbs = 0, sock_gbs = 0, place_gbs = 0;
    for (int i = 0; i < ROUNDS; i++) {
        ring_rate = fmax(ring_rate, rate(VIA_RING, MSG, RATE_RING_N, 0, SMALL_RING));
        sock_rate = fmax(sock_rate, rate(VIA_SOCKET, MSG, RATE_SOCK_N, 0, SMALL_RING));
        ring_gbs = fmax(ring_gbs, rate(VIA_RING, BIG, BIG_N, BIG_WARM, big_ring) * BIG / 1e9);
        sock_gbs = fmax(sock_gbs, rate(VIA_SOCKET, BIG, BIG_N, BIG_WARM, big_ring) * BIG / 1e9);
        place_gbs =
            fmax(place_gbs, rate(VIA_IN_PLACE, BIG, BIG_N, BIG_WARM, big_ring) * BIG / 1e9);
    }
    double lat_ratio = sock50 / spin50;
    double big_ratio = ring_gbs / sock_gbs;
    double place_ratio = place_gbs / sock_gbs;
    double oneway_ratio = sbig50 / big50;

    printf("%-40s %12s %12s  %s\n", "measure (two processes)", "ring", "socketpair", "target");
    printf("%-40s %9.3f us %9.3f us  ring <= 1 us\n", "64 B one-way p50, spinning consumer",
           spin50, sock50);
    printf("%-40s %9.3f us %9.3f us\n", "64 B one-way p99, spinning consumer", spin99, sock99);
    printf("%-40s %9.3f us %12s  ring <= 30 us\n", "64 B one-way p50, sleeping consumer",
           woken50, "");
    printf("%-40s %9.3f us\n", "64 B one-way p99, sleeping consumer", woken99);
    printf("%-40s %9.2f M/s %9.2f M/s  ring >= 5 M/s\n", "64 B messages/s", ring_rate / 1e6,
           sock_rate / 1e6);
    printf("%-40s %9.1f us %9.1f us  (information)\n", "4 MiB one message at a time, p50", big50,
           sbig50);
    printf("%-40s %9.1f us %9.1f us\n", "4 MiB one message at a time, p99", big99, sbig99);
    printf("%-40s %9.2f GB/s %8.2f GB/s\n", "4 MiB messages (copy in + copy out)", ring_gbs,
           sock_gbs);
    printf("%-40s %9.2f GB/s %8.2f GB/s\n", "4 MiB messages (copy in + read in place)",
           place_gbs, sock_gbs);
    printf("%-40s %12.1f %12s  >= 5\n", "latency_ratio_vs_socketpair", lat_ratio, "");
    printf("%-40s %12.2f %12s  >= 1.5\n", "ring_4m_vs_socketpair", big_ratio, "");
    printf("%-40s %12.2f %12s  >= 2\n", "ring_4m_inplace_vs_socketpair", place_ratio, "");
    printf("%-40s %12.2f %12s  (information)\n", "ring_4m_oneway_vs_socketpair", oneway_ratio,
           "");
    printf("{\"bench\":\"ring\",\"ring_p50_spin_us\":%.3f,\"ring_p99_spin_us\":%.3f,"
           "\"ring_p50_woken_us\":%.3f,\"ring_p99_woken_us\":%.3f,"
           "\"socketpair_p50_us\":%.3f,\"socketpair_p99_us\":%.3f,"
           "\"ring_msgs_per_s_64\":%.0f,\"socketpair_msgs_per_s_64\":%.0f,"
           "\"ring_gb_per_s_4m\":%.3f,\"socketpair_gb_per_s_4m\":%.3f,\"ring_bytes\":%llu,"
           "\"ring_in_place_gb_per_s_4m\":%.3f,"
           "\"ring_p50_4m_oneway_us\":%.1f,\"socketpair_p50_4m_oneway_us\":%.1f,"
           "\"latency_ratio_vs_socketpair\":%.2f,\"ring_4m_vs_socketpair\":%.2f,"
           "\"ring_4m_inplace_vs_socketpair\":%.2f,\"ring_4m_oneway_vs_socketpair\":%.2f}\n",
           spin50, spin99, woken50, woken99, sock50, sock99, ring_rate, sock_rate, ring_gbs,
           sock_gbs, (unsigned long long)big_ring, place_gbs, big50, sbig50, lat_ratio, big_ratio,
           place_ratio, oneway_ratio);
    return 0;
}
