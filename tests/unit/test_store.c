/* test_store: the rendezvous store (common/store.c) over real loopback TCP.
 *
 * Set, get and add between two clients; a wait answered by another client's set, and one
 * that times out within its bound; a run id of another job refused with the server's id in
 * the error; a port in use; a connect that finds nothing within its timeout; something that
 * is not a store (a listener that answers garbage) reported as RLB_EPROTO; a peer sending
 * a malformed request dropped without disturbing the other clients; clients of a stopped
 * server see RLB_EPEERDEAD rather than a hang. Host names: this machine's own name (where
 * the resolver knows it: else that case is skipped, said so) serves as the address of
 * both server and client; a name that cannot be one (refused before any DNS query) is
 * refused.
 */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"
#include "common/store.h"
#include "rlb/rlb.h"

static rlb_store_server *start(const char *run_id)
{
    rlb_store_server *s = NULL;
    assert_int_equal(rlb__store_server_start("127.0.0.1", 0, run_id, &s), 0);
    assert_true(rlb__store_server_port(s) > 0);
    return s;
}

static rlb_store *client(rlb_store_server *s, const char *run_id)
{
    rlb_store *c = NULL;
    char err[256];
    assert_int_equal(rlb__store_connect("127.0.0.1", rlb__store_server_port(s), run_id, 2000,
                                        &c, err, sizeof(err)), 0);
    return c;
}

static void test_set_get_add(void **state)
{
    rlb_store_server *s = start("job");
    rlb_store *a = client(s, "job"), *b = client(s, "job");
    char buf[64];
    size_t len = 0;
    assert_int_equal(rlb__store_get(a, "k", buf, sizeof(buf), &len), RLB_ENOTFOUND);
    assert_int_equal(rlb__store_set(a, "k", "hello", 5), 0);
    assert_int_equal(rlb__store_get(b, "k", buf, sizeof(buf), &len), 0);
    assert_int_equal(len, 5);
    assert_memory_equal(buf, "hello", 5);
    assert_int_equal(rlb__store_get(b, "k", buf, 2, &len), RLB_ETOOBIG);
    assert_int_equal(rlb__store_set(b, "k", "", 0), 0); /* an empty value is a value */
    assert_int_equal(rlb__store_get(a, "k", buf, sizeof(buf), &len), 0);
    assert_int_equal(len, 0);
    int64_t v = 0;
    assert_int_equal(rlb__store_add(a, "n", 1, &v), 0);
    assert_int_equal(v, 1);
    assert_int_equal(rlb__store_add(b, "n", 5, &v), 0);
    assert_int_equal(v, 6);
    assert_int_equal(rlb__store_get(a, "n", buf, sizeof(buf), &len), 0);
    assert_memory_equal(buf, "6", 1); /* decimal text, as torch's TCPStore keeps it */
    assert_int_equal(rlb__store_add(a, "k", 1, &v), RLB_EPROTO);
    assert_int_equal(rlb__store_get(a, "", buf, sizeof(buf), &len), RLB_EINVAL);
    rlb__store_close(a);
    rlb__store_close(b);
    rlb__store_server_stop(s);
}

typedef struct setter {
    rlb_store *c;
    int delay_ms;
} setter;

static void *set_later(void *arg)
{
    setter *t = arg;
    struct timespec ts = {0, t->delay_ms * 1000000L};
    nanosleep(&ts, NULL);
    rlb__store_set(t->c, "later", "x", 1);
    return NULL;
}

static void test_wait(void **state)
{
    rlb_store_server *s = start("job");
    rlb_store *a = client(s, "job"), *b = client(s, "job");
    char buf[8];
    size_t len;
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(rlb__store_wait(a, "never", 300, buf, sizeof(buf), &len), RLB_ETIMEDOUT);
    int64_t took = rlb__clock_ms() - t0;
    assert_true(took >= 290 && took < 1500);
    setter t = {b, 200};
    pthread_t th;
    pthread_create(&th, NULL, set_later, &t);
    t0 = rlb__clock_ms();
    assert_int_equal(rlb__store_wait(a, "later", 5000, buf, sizeof(buf), &len), 0);
    assert_true(rlb__clock_ms() - t0 < 2000);
    assert_int_equal(len, 1);
    pthread_join(th, NULL);
    /* a key already there: the wait answers at once */
    assert_int_equal(rlb__store_wait(b, "later", 0, buf, sizeof(buf), &len), 0);
    rlb__store_close(a);
    rlb__store_close(b);
    rlb__store_server_stop(s);
}

static void test_run_id_and_port(void **state)
{
    rlb_store_server *s = start("job-a");
    int port = rlb__store_server_port(s);
    rlb_store *c = NULL;
    char err[256] = "";
    assert_int_equal(rlb__store_connect("127.0.0.1", port, "job-b", 2000, &c, err, sizeof(err)),
                     RLB_EPERM);
    assert_null(c);
    assert_non_null(strstr(err, "'job-a'"));
    rlb_store_server *s2 = NULL;
    assert_int_equal(rlb__store_server_start("127.0.0.1", port, "job-b", &s2), RLB_EEXIST);
    rlb__store_server_stop(s);
    /* nothing listens now: connect gives up after its timeout */
    int64_t t0 = rlb__clock_ms();
    assert_int_equal(rlb__store_connect("127.0.0.1", port, "job-a", 300, &c, err, sizeof(err)),
                     RLB_ETIMEDOUT);
    assert_true(rlb__clock_ms() - t0 < 2000);
    assert_non_null(strstr(err, "no rendezvous store"));
}

static void *garbage_listener(void *arg)
{
    int fd = *(int *)arg;
    int c = accept(fd, NULL, NULL);
    if (c >= 0) {
        char junk[64];
        memset(junk, 'x', sizeof(junk));
        ssize_t n = send(c, junk, sizeof(junk), MSG_NOSIGNAL);
        (void)n;
        struct timespec ts = {0, 300 * 1000000L};
        nanosleep(&ts, NULL);
        close(c);
    }
    return NULL;
}

static void test_not_a_store(void **state)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(sa);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(fd, 4), 0);
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    pthread_t th;
    pthread_create(&th, NULL, garbage_listener, &fd);
    rlb_store *c = NULL;
    char err[256];
    assert_int_equal(rlb__store_connect("127.0.0.1", ntohs(sa.sin_port), "job", 2000, &c, err,
                                        sizeof(err)), RLB_EPROTO);
    assert_non_null(strstr(err, "does not answer as a rendezvous store"));
    pthread_join(th, NULL);
    close(fd);
}

static void test_malformed_and_stop(void **state)
{
    rlb_store_server *s = start("job");
    rlb_store *a = client(s, "job");
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                             .sin_port = htons((uint16_t)rlb__store_server_port(s))};
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    char junk[24];
    memset(junk, 0xff, sizeof(junk));
    assert_int_equal(send(fd, junk, sizeof(junk), MSG_NOSIGNAL), (ssize_t)sizeof(junk));
    char b;
    assert_int_equal(recv(fd, &b, 1, 0), 0); /* the server hung up on it */
    close(fd);
    assert_int_equal(rlb__store_set(a, "still", "ok", 2), 0); /* the others are served */
    rlb__store_server_stop(s);
    char buf[8];
    size_t len;
    assert_int_equal(rlb__store_get(a, "still", buf, sizeof(buf), &len), RLB_EPEERDEAD);
    rlb__store_close(a);
}

/* The store at a host name: this machine's own (a cluster's MASTER_ADDR is usually a name,
 * not an address), where getaddrinfo here gives it an IPv4 address; a name that is not one
 * resolve is refused at both ends. */
static void test_host_name(void **state)
{
    char host[256] = "", err[256];
    rlb_store_server *s = NULL;
    rlb_store *c = NULL;
    assert_int_equal(rlb__store_server_start("no such host!", 0, "job", &s), RLB_EINVAL);
    assert_int_equal(rlb__store_connect("no such host!", 1, "job", 300, &c, err,
                                        sizeof(err)), RLB_EINVAL);
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
    if (gethostname(host, sizeof(host) - 1) != 0 || getaddrinfo(host, NULL, &hints, &res) != 0) {
        print_message("skipped the own-name case: this machine's name does not resolve\n");
        return;
    }
    freeaddrinfo(res);
    assert_int_equal(rlb__store_server_start(host, 0, "job", &s), 0);
    assert_int_equal(rlb__store_connect(host, rlb__store_server_port(s), "job", 2000, &c, err,
                                        sizeof(err)), 0);
    char buf[8];
    size_t len = 0;
    assert_int_equal(rlb__store_set(c, "k", "v", 1), 0);
    assert_int_equal(rlb__store_get(c, "k", buf, sizeof(buf), &len), 0);
    assert_int_equal(len, 1);
    rlb__store_close(c);
    rlb__store_server_stop(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_set_get_add),     cmocka_unit_test(test_wait),
        cmocka_unit_test(test_run_id_and_port), cmocka_unit_test(test_not_a_store),
        cmocka_unit_test(test_malformed_and_stop), cmocka_unit_test(test_host_name),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
