/* executor_cpu.c: the CPU reshard executor (kernels/executor.h): host memory the caller
 * mapped, a run is one thread executing rlb__plan_exec_cpu that writes the run's eventfd
 * as its last act. The executor keeps the plan's LoRA stage (rlb_exec_scratch) from run
 * to run, so a sync with adapters does not allocate and fault it in every step. Check: tests/unit/test_executor.c (against rlb__plan_exec_cpu on the
 * same plan) and every bridge integration test. */
#include "kernels/executor.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "kernels/cpu/plan_exec.h"

typedef struct cpu_exec {
    rlb_executor base;
    pthread_t tid;       /* the run's thread */
    int running;         /* a thread was started and not joined */
    rlb_plan plan;       /* the run's plan (ops borrowed from the caller's copy) */
    rlb_exec_run run;    /* the run's tables, copied */
    void **src, **dst;   /* owned copies of the tables */
    uint64_t *src_len, *dst_len;
    rlb_exec_scratch scratch; /* the LoRA stage, kept across runs (one run at a time) */
    int rc;              /* outcome of the run */
    double ms;           /* its time */
    char err[512];       /* why it failed */
} cpu_exec;

static void *run_thread(void *arg)
{
    cpu_exec *c = arg;
    double t0 = rlb__clock_ms_f();
    c->err[0] = 0;
    c->rc = rlb__plan_exec_cpu_counted(&c->plan, (const void *const *)c->src, c->src_len,
                                       (void *const *)c->dst, c->dst_len, c->run.threads,
                                       &c->scratch, c->run.nonfinite, c->err, sizeof(c->err));
    c->ms = rlb__clock_ms_f() - t0;
    uint64_t one = 1;
    /* The eventfd write is the thread's last touch of c; the owner reads c only after
     * reading the eventfd and joining the thread (finish). */
    ssize_t n = write(c->run.done_fd, &one, sizeof(one));
    (void)n;
    return NULL;
}

static void free_tables(cpu_exec *c)
{
    free(c->src);
    free(c->dst);
    free(c->src_len);
    free(c->dst_len);
    c->src = c->dst = NULL;
    c->src_len = c->dst_len = NULL;
}

static int cpu_fence(rlb_executor *x)
{
    cpu_exec *c = (cpu_exec *)x;
    if (c->running) {
        pthread_join(c->tid, NULL);
        c->running = 0;
    }
    return 0;
}

static int cpu_map(rlb_executor *x, const rlb_exec_ref *ref, void **addr, char *err,
                   size_t errlen)
{
    if (ref->kind != 0 || !ref->host) {
        if (err && errlen)
            snprintf(err, errlen, "the CPU executor reads host memory only (reference kind "
                     "%d)", ref->kind);
        return RLB_EUNSUPPORTED;
    }
    *addr = (char *)ref->host + ref->offset;
    return 0;
}

static int cpu_unmap(rlb_executor *x, const rlb_exec_ref *ref, void *addr)
{
    return 0;
}

static int cpu_run(rlb_executor *x, const rlb_exec_run *run, char *err, size_t errlen)
{
    cpu_exec *c = (cpu_exec *)x;
    if (c->running) {
        if (err && errlen)
            snprintf(err, errlen, "a run is already in flight");
        return RLB_EEXIST;
    }
    const rlb_plan *p = run->plan;
    free_tables(c);
    c->src = malloc(p->n_src * sizeof(*c->src) + 1);
    c->src_len = malloc(p->n_src * sizeof(*c->src_len) + 1);
    c->dst = malloc(p->n_dst * sizeof(*c->dst) + 1);
    c->dst_len = malloc(p->n_dst * sizeof(*c->dst_len) + 1);
    if (!c->src || !c->src_len || !c->dst || !c->dst_len) {
        free_tables(c);
        return RLB_ENOMEM;
    }
    memcpy(c->src, run->src, p->n_src * sizeof(*c->src));
    memcpy(c->src_len, run->src_len, p->n_src * sizeof(*c->src_len));
    memcpy(c->dst, run->dst, p->n_dst * sizeof(*c->dst));
    memcpy(c->dst_len, run->dst_len, p->n_dst * sizeof(*c->dst_len));
    c->plan = *p;
    c->run = *run;
    if (pthread_create(&c->tid, NULL, run_thread, c) != 0) {
        free_tables(c);
        if (err && errlen)
            snprintf(err, errlen, "cannot start the copy thread");
        return RLB_EIO;
    }
    c->running = 1;
    return 0;
}

static int cpu_finish(rlb_executor *x, double *ms, char *err, size_t errlen)
{
    cpu_exec *c = (cpu_exec *)x;
    cpu_fence(x);
    free_tables(c);
    if (ms)
        *ms = c->ms;
    if (c->rc < 0 && err && errlen)
        snprintf(err, errlen, "%s", c->err[0] ? c->err : rlb_strerror(c->rc));
    return c->rc;
}

static void cpu_destroy(rlb_executor *x)
{
    if (!x)
        return;
    cpu_fence(x);
    free_tables((cpu_exec *)x);
    rlb__exec_scratch_free(&((cpu_exec *)x)->scratch);
    free(x);
}

static const rlb_executor_iface_v1 cpu_exec_iface = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .map = cpu_map,
    .unmap = cpu_unmap,
    .run = cpu_run,
    .finish = cpu_finish,
    .fence = cpu_fence,
};

int rlb__executor_cpu_create(rlb_executor **out)
{
    cpu_exec *c = calloc(1, sizeof *c);
    if (!c)
        return RLB_ENOMEM;
    c->base.iface = &cpu_exec_iface;
    *out = &c->base;
    return 0;
}
