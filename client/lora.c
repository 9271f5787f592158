/* lora.c: declaring LoRA adapters (rlb_register_lora / rlb_unregister_lora) and mapping PEFT
 * parameter names to the HF names rlbridge uses (DESIGN §10).
 *
 * Declarations travel in a REGISTER message of their own ("lora" entries, no tensors), so
 * the bridge answers them in order like any registration; rank 0 takes one back. The scale
 * is computed here, once, from alpha, r and rsLoRA, so every rank sends the same number.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_internal.h"
#include "common/check.h"

#define TARGET_MAX_BYTES 512 /* longest weight name accepted, NUL included */

RLB_API void rlb_lora_desc_init(rlb_lora_desc *desc)
{
    if (desc)
        *desc = (rlb_lora_desc)RLB_LORA_DESC_INIT;
}

static int peft_to_hf(const char *peft, const char *adapter, char *out, size_t cap, char *why,
                      size_t whylen);

/* Sends `n` declarations as one REGISTER and waits for the bridge's answer. */
static int send_loras(rlb_client *c, const rlb_msg_lora *loras, uint32_t n)
{
    rlb_msg msg = {.type = RLB_MSG_REGISTER, .reg = {.n_loras = n, .loras = loras}};
    return rlb__control(c, &msg, 1);
}

RLB_API int rlb_register_lora(rlb_client *client, const rlb_lora_desc *adapters, size_t n)
{
    if (!client)
        return RLB_EINVAL;
    rlb_client *c = client;
    if (!adapters || n == 0 || n > UINT32_MAX / 2)
        return rlb__fail(c, RLB_EINVAL, "rlb_register_lora needs 1 or more adapters");
    if (c->observer)
        return rlb__fail(c, RLB_EPERM, "an observer client cannot declare adapters");
    size_t stride = adapters[0].struct_size;
    RLB_CHECK(rlb__check_struct_size(c, stride, sizeof(rlb_lora_desc), sizeof(rlb_lora_desc),
                                     "rlb_lora_desc"));
    rlb_msg_lora *wire = calloc(n, sizeof(*wire));
    char (*names)[TARGET_MAX_BYTES] = calloc(n, sizeof(*names));
    char why[RLB_CLIENT_ERR_MAX - 64];
    int rc = RLB_ENOMEM;
    if (!wire || !names) {
        rlb__fail(c, rc, "no memory for %zu adapters", n);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        const rlb_lora_desc *d = (const rlb_lora_desc *)((const char *)adapters + stride * i);
        rc = RLB_EINVAL;
        if (d->struct_size != stride) {
            rlb__fail(c, rc, "adapter %zu has another struct_size than adapter 0", i);
            goto out;
        }
        double scale = d->rslora ? d->alpha / sqrt((double)d->rank) : d->alpha / (double)d->rank;
        if (!d->target || d->rank == 0 || !isfinite(scale)) {
            rlb__fail(c, rc, "adapter %zu: %s", i, !d->target ? "target is NULL"
                                                   : d->rank == 0 ? "rank is 0, not >= 1"
                                                                  : "alpha is not finite");
            goto out;
        }
        /* PEFT's names for the base weight are accepted too. */
        if ((rc = peft_to_hf(d->target, NULL, names[i], sizeof(names[i]), why, sizeof(why))) < 0) {
            rlb__fail(c, rc, "adapter %zu: %s", i, why);
            goto out;
        }
        wire[i] = (rlb_msg_lora){.target = names[i], .rank = d->rank, .scale = scale};
    }
    rc = send_loras(c, wire, (uint32_t)n);
out:
    free(wire);
    free(names);
    return rc;
}

RLB_API int rlb_unregister_lora(rlb_client *client, const char *const *targets, size_t n)
{
    if (!client)
        return RLB_EINVAL;
    rlb_client *c = client;
    if ((n && !targets) || n > UINT32_MAX / 2)
        return rlb__fail(c, RLB_EINVAL, "rlb_unregister_lora: %zu targets but no array", n);
    if (c->observer)
        return rlb__fail(c, RLB_EPERM, "an observer client cannot declare adapters");
    rlb_msg_lora every = {.target = "*"};
    if (n == 0)
        return send_loras(c, &every, 1);
    rlb_msg_lora *wire = calloc(n, sizeof(*wire));
    char (*names)[TARGET_MAX_BYTES] = calloc(n, sizeof(*names));
    char why[RLB_CLIENT_ERR_MAX - 64];
    int rc = RLB_ENOMEM;
    if (!wire || !names) {
        rlb__fail(c, rc, "no memory for %zu targets", n);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        if (!targets[i]) {
            rc = rlb__fail(c, RLB_EINVAL, "target %zu is NULL", i);
            goto out;
        }
        if ((rc = peft_to_hf(targets[i], NULL, names[i], sizeof(names[i]), why, sizeof(why))) < 0) {
            rc = rlb__fail(c, rc, "target %zu: %s", i, why);
            goto out;
        }
        wire[i] = (rlb_msg_lora){.target = names[i]};
    }
    rc = send_loras(c, wire, (uint32_t)n);
out:
    free(wire);
    free(names);
    return rc;
}

/* ---- PEFT names ------------------------------------------------------------------------- */

/* Segments wrappers insert into module paths; they name no module of the model. */
static int is_wrapper(const char *seg, size_t n)
{
    static const char *const wrappers[] = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module",
                                           "_orig_mod"};
    for (size_t i = 0; i < sizeof wrappers / sizeof wrappers[0]; i++)
        if (strlen(wrappers[i]) == n && !memcmp(seg, wrappers[i], n))
            return 1;
    return 0;
}

static int seg_is(const char *seg, size_t n, const char *word)
{
    return strlen(word) == n && !memcmp(seg, word, n);
}

/* rlb_peft_to_hf, with the reason of a refusal written into why[whylen]. */
static int peft_to_hf(const char *peft, const char *adapter, char *out, size_t cap, char *why,
                      size_t whylen)
{
    static const char prefix[] = "base_model.model.";
    if (!peft || !*peft || !out || cap == 0)
        return snprintf(why, whylen, "a name and room for the result are needed"), RLB_EINVAL;
    const char *s = peft;
    size_t len = 0;
    /* Walk the dot-separated segments, copying the ones that name modules. */
    while (*s) {
        const char *dot = strchr(s, '.');
        size_t n = dot ? (size_t)(dot - s) : strlen(s);
        const char *next = dot ? dot + 1 : s + n;
        if (n == 0)
            return snprintf(why, whylen, "'%.200s' has an empty segment", peft), RLB_EINVAL;
        const char *emit = NULL;
        if (is_wrapper(s, n) || seg_is(s, n, "base_layer")) {
            s = next;
            continue;
        }
        /* PeftModel's own prefix, wherever wrappers put it before the model's modules. */
        if (len == 0 && !strncmp(s, prefix, sizeof prefix - 1)) {
            s += sizeof prefix - 1;
            continue;
        }
        if (seg_is(s, n, "lora_magnitude_vector"))
            return snprintf(why, whylen, "'%.200s': DoRA's lora_magnitude_vector is not "
                            "supported", peft), RLB_EUNSUPPORTED;
        int linear = seg_is(s, n, "lora_A") || seg_is(s, n, "lora_B");
        int embed = seg_is(s, n, "lora_embedding_A") || seg_is(s, n, "lora_embedding_B");
        if (linear || embed) {
            /* lora_A.<adapter>.weight, lora_embedding_A.<adapter>: the end of the name. */
            char f = s[n - 1];
            const char *name = next, *ndot = strchr(name, '.');
            size_t nn = ndot ? (size_t)(ndot - name) : strlen(name);
            const char *rest = ndot ? ndot + 1 : name + nn;
            if (nn == 0 || (linear && strcmp(rest, "weight")) || (embed && *rest))
                return snprintf(why, whylen, "'%.200s': a LoRA factor ends in lora_A.<adapter>"
                                ".weight or lora_embedding_A.<adapter>", peft), RLB_EINVAL;
            if (adapter && !seg_is(name, nn, adapter))
                return snprintf(why, whylen, "'%.200s' is a factor of adapter '%.*s', not of "
                                "'%.200s'", peft, (int)nn, name, adapter), RLB_ENOTFOUND;
            emit = f == 'A' ? "lora_A.weight" : "lora_B.weight";
            next = "";
        }
        size_t add = emit ? strlen(emit) : n;
        if (len + (len ? 1 : 0) + add >= cap)
            return snprintf(why, whylen, "the HF name of '%.200s' needs more than %zu bytes",
                            peft, cap), RLB_ETOOBIG;
        if (len)
            out[len++] = '.';
        memcpy(out + len, emit ? emit : s, add);
        len += add;
        s = next;
    }
    if (len == 0)
        return snprintf(why, whylen, "'%.200s' names no module", peft), RLB_EINVAL;
    if (peft[strlen(peft) - 1] == '.')
        return snprintf(why, whylen, "'%.200s' ends in a dot", peft), RLB_EINVAL;
    out[len] = '\0';
    return 0;
}

RLB_API int rlb_peft_to_hf(const char *peft_name, const char *adapter, char *out, size_t cap)
{
    char why[RLB_CLIENT_ERR_MAX - 64];
    rlb__call_begin();
    int rc = peft_to_hf(peft_name, adapter, out, cap, why, sizeof(why));
    return rc < 0 ? rlb__fail_call(rc, "rlb_peft_to_hf: %s", why) : 0;
}
