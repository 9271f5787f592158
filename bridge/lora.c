/* lora.c: the LoRA adapters trainer ranks declare, and the parameter list that carries them
 * (DESIGN §10).
 *
 * A declaration (weight, rank r, scale s) belongs to the rank that sent it and lasts until
 * that rank takes it back (rank 0 in a REGISTER's "lora" entries) or disconnects. Ranks
 * that declare the same weight must agree on r and s. The bridge's parameter list is the
 * model's plus one adapter per declared weight, rebuilt whenever declarations change (the
 * plan, whose source borrows the list, is dropped first); the factors the ranks register
 * are then checked and planned like any tensor, and factors of a weight whose declaration
 * is gone are ignored, so the next version is the base again. Every sync copies the base
 * from where the trainer registered it and merges onto that, so no version builds on the
 * last.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bridge/bridge_int.h"
#include "common/log.h"
#include "model/lora.h"

/* The declaration of `target` by p, or NULL. */
static br_lora *find(br_peer *p, const char *target)
{
    for (uint32_t i = 0; i < p->n_loras; i++)
        if (!strcmp(p->loras[i].target, target))
            return &p->loras[i];
    return NULL;
}

static void remove_at(br_peer *p, uint32_t i)
{
    free(p->loras[i].target);
    p->loras[i] = p->loras[--p->n_loras];
}

/* Checks declaration d from p against the model and the other ranks. */
static int check_one(bridge *b, br_peer *p, const rlb_msg_lora *d, char *err, size_t errlen)
{
    if (d->rank == 0)
        return !strcmp(d->target, "*") || find(p, d->target)
                   ? 0
                   : rlb__model_err(err, errlen, RLB_ENOTFOUND, "adapter of '%s': this rank "
                                    "declared none", d->target);
    /* The model's own checks, on a scratch list. */
    rlb_param_list scratch;
    int rc = rlb__params_init(&scratch, &b->opts->cfg, err, errlen);
    if (rc == 0)
        rc = rlb__params_add_adapter(&scratch, d->target, d->rank, (float)d->scale, err,
                                     errlen);
    rlb__params_free(&scratch);
    if (rc)
        return rc;
    for (uint32_t r = 0; r < b->world; r++) {
        br_peer *q = b->trainers[r];
        br_lora *o = q && q != p ? find(q, d->target) : NULL;
        if (o && (o->rank != d->rank || (float)o->scale != (float)d->scale))
            return rlb__model_err(err, errlen, RLB_EEXIST, "adapter of '%s': trainer rank %u "
                                  "declared rank %u, scale %g", d->target, r, o->rank,
                                  o->scale);
    }
    return 0;
}

/* Builds the model's list plus every declared adapter into *out. */
static int build_params(bridge *b, rlb_param_list *out, char *err, size_t errlen)
{
    int rc = rlb__params_init(out, &b->opts->cfg, err, errlen);
    for (uint32_t r = 0; r < b->world && rc == 0; r++) {
        br_peer *q = b->trainers[r];
        for (uint32_t i = 0; q && i < q->n_loras && rc == 0; i++) {
            const br_lora *l = &q->loras[i];
            if (!rlb__params_adapter_of(out, rlb__params_find(out, l->target)))
                rc = rlb__params_add_adapter(out, l->target, l->rank, (float)l->scale, err,
                                             errlen);
        }
    }
    if (rc)
        rlb__params_free(out);
    return rc;
}

/* Puts the list for the current declarations in place. Returns 0 or RLB_ENOMEM (the old
 * list stays). */
static int rebuild(bridge *b, char *err, size_t errlen)
{
    rlb_param_list fresh;
    int rc = build_params(b, &fresh, err, errlen);
    if (rc)
        return rc;
    br_plan_reset(b);
    rlb__params_free(&b->params);
    b->params = fresh;
    return 0;
}

int br_lora_declare(bridge *b, br_peer *p, const rlb_msg_register *m, char *err,
                    size_t errlen)
{
    for (uint32_t i = 0; i < m->n_loras; i++) {
        int rc = check_one(b, p, &m->loras[i], err, errlen);
        if (rc)
            return rc;
    }
    /* Room first, so applying cannot fail half way. */
    if (p->n_loras + m->n_loras > p->cap_loras) {
        uint32_t cap = p->n_loras + m->n_loras + p->cap_loras;
        br_lora *grown = realloc(p->loras, cap * sizeof(*grown));
        if (!grown)
            return rlb__model_err(err, errlen, RLB_ENOMEM, "out of memory");
        p->loras = grown;
        p->cap_loras = cap;
    }
    char **names = calloc(m->n_loras + 1, sizeof(*names));
    for (uint32_t i = 0; names && i < m->n_loras; i++)
        if (m->loras[i].rank && !(names[i] = strdup(m->loras[i].target))) {
            for (uint32_t k = 0; k < i; k++)
                free(names[k]);
            free(names);
            names = NULL;
        }
    if (!names)
        return rlb__model_err(err, errlen, RLB_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < m->n_loras; i++) {
        const rlb_msg_lora *d = &m->loras[i];
        for (uint32_t k = p->n_loras; k-- > 0;)
            if (!strcmp(d->target, "*") || !strcmp(p->loras[k].target, d->target))
                remove_at(p, k);
        if (d->rank)
            p->loras[p->n_loras++] = (br_lora){.target = names[i], .rank = d->rank,
                                               .scale = d->scale};
    }
    free(names);
    int rc = rebuild(b, err, errlen);
    if (rc == 0)
        RLB_LOG_INFO(RLB_SUB_BRIDGE, "trainer rank %u changed %u adapter declarations; %lld "
                     "adapters in all", p->hello.rank, m->n_loras,
                     (long long)b->params.n_adapters);
    return rc;
}

void br_lora_drop(bridge *b, br_peer *p)
{
    int had = p->n_loras > 0;
    while (p->n_loras)
        remove_at(p, p->n_loras - 1);
    free(p->loras);
    p->loras = NULL;
    p->cap_loras = 0;
    char err[256];
    if (had && rebuild(b, err, sizeof(err)) < 0)
        RLB_LOG_WARN(RLB_SUB_BRIDGE, "adapters of a gone rank stay declared: %s", err);
}

int br_lora_undeclared_factor(const bridge *b, const char *name)
{
    char target[RLB_PARAM_NAME_MAX];
    rlb_lora_factor f;
    return rlb__lora_split_name(name, target, sizeof(target), &f) == 0 &&
           rlb__params_find(&b->params, name) < 0 && rlb__params_find(&b->params, target) >= 0;
}
