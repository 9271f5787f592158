/* stats.c: the bridge's counters on request (a stats message, answered by a stats reply
 * with the same request id) and the list object that hands them to the caller.
 */
#include <stdlib.h>
#include <string.h>

#include "client/client_internal.h"
#include "common/check.h"

struct rlb_stat_list {
    size_t n;      /* counters */
    char **names;  /* [n] owned copies */
    double *values; /* [n] */
};

RLB_API void rlb_stat_list_free(rlb_stat_list *list)
{
    if (!list)
        return;
    for (size_t i = 0; i < list->n; i++)
        free(list->names[i]);
    free(list->names);
    free(list->values);
    free(list);
}

/* A copy of the reply's counters, or NULL when memory ran out. */
static rlb_stat_list *list_from(const rlb_msg_stats_reply *reply)
{
    rlb_stat_list *l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    size_t n = reply->n_stats;
    l->names = calloc(n ? n : 1, sizeof(*l->names));
    l->values = calloc(n ? n : 1, sizeof(*l->values));
    if (!l->names || !l->values)
        goto err;
    for (; l->n < n; l->n++) {
        l->names[l->n] = strdup(reply->stats[l->n].name);
        if (!l->names[l->n])
            goto err;
        l->values[l->n] = reply->stats[l->n].value;
    }
    return l;
err:
    rlb_stat_list_free(l);
    return NULL;
}

static rlb__stats_wait *find_wait(rlb_client *c, uint64_t id)
{
    for (uint32_t i = 0; i < c->n_stats_waits; i++)
        if (c->stats_waits[i].id == id)
            return &c->stats_waits[i];
    return NULL;
}

void rlb__stats_on_reply(rlb_client *c, const rlb_msg_stats_reply *reply)
{
    rlb__stats_wait *w = find_wait(c, reply->request_id);
    if (!w || w->done)
        return;
    w->done = 1;
    w->list = list_from(reply);
    w->code = w->list ? 0 : RLB_ENOMEM;
}

int rlb__stats_on_error(rlb_client *c, uint64_t id, int code, const char *text)
{
    rlb__stats_wait *w = find_wait(c, id);
    if (!w || w->done)
        return 0;
    w->done = 1;
    w->code = rlb__fail_locked(c, code, "bridge refused the stats request: %s", text);
    return 1;
}

void rlb__stats_fail_all(rlb_client *c, int code)
{
    for (uint32_t i = 0; i < c->n_stats_waits; i++)
        if (!c->stats_waits[i].done) {
            c->stats_waits[i].done = 1;
            c->stats_waits[i].code = code;
        }
}

void rlb__stats_free_all(rlb_client *c)
{
    for (uint32_t i = 0; i < c->n_stats_waits; i++)
        rlb_stat_list_free(c->stats_waits[i].list);
    free(c->stats_waits);
    c->stats_waits = NULL;
    c->n_stats_waits = c->cap_stats_waits = 0;
}

static int stats_done(rlb_client *c, void *arg)
{
    rlb__stats_wait *w = find_wait(c, *(const uint64_t *)arg);
    return !w || w->done;
}

RLB_API int rlb_bridge_stats(rlb_client *client, rlb_stat_list **out)
{
    if (!client || !out)
        return RLB_EINVAL;
    *out = NULL;
    rlb_client *c = client;
    pthread_mutex_lock(&c->lock);
    int rc = c->dead;
    if (rc == 0)
        rc = rlb__grow(&c->stats_waits, &c->cap_stats_waits, c->n_stats_waits + 1,
                       sizeof(*c->stats_waits));
    if (rc < 0) {
        pthread_mutex_unlock(&c->lock);
        return rlb__fail(c, rc, "cannot ask the bridge for stats");
    }
    uint64_t id = rlb__next_id(c);
    c->stats_waits[c->n_stats_waits++] = (rlb__stats_wait){.id = id};
    pthread_mutex_unlock(&c->lock);

    rlb_msg msg = {.type = RLB_MSG_STATS, .stats = {.request_id = id}};
    rc = rlb__send(c, &msg, c->request_timeout_ms);
    pthread_mutex_lock(&c->lock);
    if (rc == 0)
        rc = rlb__wait(c, stats_done, &id, c->request_timeout_ms);
    rlb__stats_wait *w = find_wait(c, id);
    if (rc == 0)
        rc = w->code;
    if (rc == 0) {
        *out = w->list;
        w->list = NULL;
    } else if (rc == RLB_ETIMEDOUT) {
        rlb__fail_locked(c, rc, "no stats reply within %d ms", c->request_timeout_ms);
    }
    rlb_stat_list_free(w->list);
    *w = c->stats_waits[--c->n_stats_waits];
    pthread_mutex_unlock(&c->lock);
    return rc;
}

RLB_API size_t rlb_stat_list_size(const rlb_stat_list *list)
{
    return list ? list->n : 0;
}

RLB_API int rlb_stat_list_get(const rlb_stat_list *list, size_t i, const char **name,
                              double *value)
{
    if (!list || i >= list->n)
        return RLB_EINVAL;
    if (name)
        *name = list->names[i];
    if (value)
        *value = list->values[i];
    return 0;
}

RLB_API int rlb_stat_list_find(const rlb_stat_list *list, const char *name, double *value)
{
    if (!list || !name)
        return RLB_EINVAL;
    for (size_t i = 0; i < list->n; i++)
        if (!strcmp(list->names[i], name)) {
            if (value)
                *value = list->values[i];
            return 0;
        }
    return RLB_ENOTFOUND;
}
