/* test_peft_fixture.c: the bridge's LoRA merge against PEFT itself (DESIGN §10), on the
 * golden fixture scripts/make_peft_fixture.py writes into tests/fixtures/peft_lora: a tiny
 * Llama's bf16 base, a PEFT adapter (rank 8, alpha 16 on q, k, v, o, gate, up and down of
 * every layer, saved by PEFT in bf16 under PEFT's names) and merge_and_unload()'s weights
 * rounded to bf16.
 *
 * A trainer rank on the public API declares the adapters (rank from the factors, alpha from
 * adapter_config.json), registers the base and the factors (PEFT's saved names, less
 * PeftModel's prefix) as bf16 host tensors and publishes; a bridge and CPU workers serve the
 * fixture's config, TP 1 and then TP 2. Every element of every worker buffer (read through
 * /proc/PID/mem; the CPU workers hold f32) must then be within one bf16 ulp of the
 * fixture's merged value plus the f32 sums' error ((r + 2) 2^-24 (|W| + |s| sum |B A terms|),
 * which only matters where W and the delta cancel), equal to it where no adapter applies,
 * and zero on padding rows. Then the adapters are taken back and every buffer must hold the
 * base, bit for bit. Prints the largest distance in ulps and how many merged elements, once
 * rounded to bf16, differ from PEFT's.
 *
 * Exits 77 (skip) while the fixture has not been generated (it is made on a machine with
 * torch, transformers and peft), or where the workers' memory cannot be read.
 */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "model/config.h"
#include "model/safetensors.h"
#include "tests/integration/bridge_harness.h"
#include "tests/unit/plan_ref.h"

#define FIXTURE RLB_FIXTURES_DIR "/peft_lora"
#define MAX_TENSORS 64
#define MAX_ADAPTERS 64

/* The fixture: its config, checkpoints and adapter settings. */
typedef struct fixture {
    rlb_model_config cfg;
    rlb_st_checkpoint *base, *adapter, *merged;
    double alpha;                        /* lora_alpha of adapter_config.json */
    int n_ad;                            /* adapted weights */
    char target[MAX_ADAPTERS][96];       /* their HF names */
    const rlb_st_tensor *a[MAX_ADAPTERS], *b[MAX_ADAPTERS]; /* their factors */
} fixture;

static int skipped; /* a test found it cannot run here */

static float bf16_at(const rlb_st_tensor *t, uint64_t i)
{
    uint16_t h;
    memcpy(&h, (const uint8_t *)t->data + 2 * i, 2);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The HF name of a factor as PEFT saves it ("base_model.model.<module>.lora_A.weight": the
 * adapter's name is left out of saved files, a form rlb_peft_to_hf refuses). */
static const char *hf_factor_name(const char *saved)
{
    static const char prefix[] = "base_model.model.";
    if (strncmp(saved, prefix, sizeof prefix - 1))
        fail_msg("adapter tensor '%s' is not named as PEFT saves factors", saved);
    return saved + sizeof prefix - 1;
}

/* The number after "key": in the JSON text of `path`. */
static double json_number(const char *path, const char *key)
{
    FILE *f = fopen(path, "r");
    char text[8192], pat[64];
    size_t n = f ? fread(text, 1, sizeof text - 1, f) : 0;
    if (f)
        fclose(f);
    text[n] = 0;
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *at = strstr(text, pat);
    if (!at)
        fail_msg("%s: no \"%s\"", path, key);
    return strtod(at + strlen(pat), NULL);
}

static void fixture_open(fixture *f)
{
    char err[256] = "";
    memset(f, 0, sizeof *f);
    if (rlb__config_load_dir(FIXTURE, &f->cfg, err, sizeof err) ||
        rlb__st_open(FIXTURE "/base.safetensors", &f->base, err, sizeof err) ||
        rlb__st_open(FIXTURE "/adapter_model.safetensors", &f->adapter, err, sizeof err) ||
        rlb__st_open(FIXTURE "/merged.safetensors", &f->merged, err, sizeof err))
        fail_msg("fixture: %s", err);
    f->alpha = json_number(FIXTURE "/adapter_config.json", "lora_alpha");
    for (size_t i = 0; i < rlb__st_count(f->adapter); i++) {
        const rlb_st_tensor *t = rlb__st_at(f->adapter, i);
        const char *hf = hf_factor_name(t->name);
        size_t len = strlen(hf), k = strlen(".lora_A.weight");
        if (len <= k || strcmp(hf + len - k, ".lora_A.weight"))
            continue;
        assert_true(f->n_ad < MAX_ADAPTERS);
        snprintf(f->target[f->n_ad], sizeof f->target[0], "%.*s.weight", (int)(len - k), hf);
        /* B's PEFT name is A's with the factor letter changed. */
        char bname[192];
        snprintf(bname, sizeof bname, "%s", t->name);
        char *letter = strstr(bname, ".lora_A.");
        assert_non_null(letter);
        letter[6] = 'B';
        f->a[f->n_ad] = t;
        f->b[f->n_ad] = rlb__st_find(f->adapter, bname);
        assert_non_null(f->b[f->n_ad]);
        assert_int_equal(t->dtype, RLB_DTYPE_BF16);
        f->n_ad++;
    }
    assert_true(f->n_ad == 7 * (int)f->cfg.n_layers);
}

static void fixture_close(fixture *f)
{
    rlb__st_close(f->base);
    rlb__st_close(f->adapter);
    rlb__st_close(f->merged);
}

/* Registers the base and the factors as bf16 host tensors of trainer c, and declares the
 * adapters. */
static void register_fixture(rlb_client *c, const fixture *f)
{
    size_t nb = rlb__st_count(f->base), n = nb + 2 * (size_t)f->n_ad;
    rlb_tensor_desc *d = calloc(n, sizeof *d);
    uint64_t bytes = 0;
    for (size_t i = 0; i < nb; i++)
        bytes += (rlb__st_at(f->base, i)->nbytes + 63) / 64 * 64;
    for (int k = 0; k < f->n_ad; k++)
        bytes += (f->a[k]->nbytes + 63) / 64 * 64 + (f->b[k]->nbytes + 63) / 64 * 64;
    uint8_t *mem;
    assert_int_equal(rlb_alloc_host(c, bytes, (void **)&mem), 0);
    for (size_t i = 0; i < n; i++) {
        const rlb_st_tensor *t = i < nb ? rlb__st_at(f->base, i)
                                 : (i - nb) % 2 ? f->b[(i - nb) / 2] : f->a[(i - nb) / 2];
        rlb_tensor_desc_init(&d[i]);
        d[i].name = i < nb ? t->name : hf_factor_name(t->name);
        d[i].dtype = t->dtype;
        d[i].ndim = (uint32_t)t->ndim;
        for (int j = 0; j < t->ndim; j++)
            d[i].shape[j] = (uint64_t)t->shape[j];
        memcpy(mem, t->data, t->nbytes);
        d[i].data = mem;
        mem += (t->nbytes + 63) / 64 * 64;
    }
    rlb_lora_desc ld[MAX_ADAPTERS];
    for (int k = 0; k < f->n_ad; k++) {
        rlb_lora_desc_init(&ld[k]);
        ld[k].target = f->target[k];
        ld[k].rank = (uint32_t)f->a[k]->shape[0];
        ld[k].alpha = (float)f->alpha;
    }
    assert_int_equal(rlb_register_lora(c, ld, (size_t)f->n_ad), 0);
    if (rlb_register(c, d, n))
        fail_msg("register: %s", rlb_last_error(c));
    free(d);
}

/* The adapter of weight `name`, or -1. */
static int adapter_of(const fixture *f, const char *name)
{
    for (int k = 0; k < f->n_ad; k++)
        if (!strcmp(f->target[k], name))
            return k;
    return -1;
}

/* Largest distance (in bf16 ulps) and count of elements that round to other bf16 values,
 * over the merged elements of one check. */
typedef struct found {
    double worst_ulps;
    uint64_t merged, rounded_apart;
} found;

/* Checks TP rank t's buffer (T ranks) against the fixture: merged weights where adapters
 * apply (merged != 0), the base elsewhere. Returns 0, or 77 when it cannot be read. */
static int check_worker(const h_run *r, const fixture *f, int T, int t, int merged, found *fd)
{
    uint64_t bytes = 0, total;
    float *buf = h_worker_weights(r->workers[t], 0, &bytes);
    if (!buf) {
        printf("skip: worker TP rank %d's memory cannot be read: %s\n", t, strerror(errno));
        return 77;
    }
    ref_model m;
    ref_model_init(&m, &f->cfg, 0);
    ref_tensor rt[MAX_TENSORS];
    int nt = ref_tensors(&f->cfg, T, sizeof(float), rt, &total);
    assert_true(total <= bytes);
    for (int k = 0; k < nt; k++)
        for (int64_t lr = 0; lr < rt[k].rows; lr++)
            for (int64_t lc = 0; lc < rt[k].cols; lc++) {
                float got = buf[rt[k].offset / 4 + (uint64_t)(lr * rt[k].cols + lc)];
                int which;
                int64_t gr, gc;
                if (!ref_origin(&f->cfg, T, t, rt[k].kind, lr, lc, &which, &gr, &gc)) {
                    if (got != 0.0f)
                        fail_msg("TP %d/%d tensor %d: padding row %lld is not zero", t, T, k,
                                 (long long)lr);
                    continue;
                }
                const char *name = m.p[m.idx[(rt[k].layer + 1) * P_KINDS + which]].name;
                const rlb_st_tensor *w = rlb__st_find(f->base, name);
                const rlb_st_tensor *x = rlb__st_find(f->merged, name);
                assert_non_null(w);
                assert_non_null(x);
                int64_t cols = w->ndim == 2 ? w->shape[1] : 1;
                uint64_t e = (uint64_t)(gr * cols + gc);
                int ad = merged ? adapter_of(f, name) : -1;
                float want = ad >= 0 ? bf16_at(x, e) : bf16_at(w, e);
                if (ad < 0) {
                    if (memcmp(&got, &want, 4))
                        fail_msg("TP %d/%d %s[%lld, %lld]: %.9g, want %.9g (bit for bit)", t, T,
                                 name, (long long)gr, (long long)gc, got, want);
                    continue;
                }
                const rlb_st_tensor *A = f->a[ad], *B = f->b[ad];
                int64_t rank = A->shape[0];
                double s = f->alpha / (double)rank, mag = 0;
                for (int64_t j = 0; j < rank; j++)
                    mag += fabs((double)bf16_at(B, (uint64_t)(gr * rank + j)) *
                                bf16_at(A, (uint64_t)(j * A->shape[1] + gc)));
                double big = fabs(want) > fabs(got) ? fabs(want) : fabs(got);
                int ex;
                frexp(big, &ex);
                double ulp = ldexp(1.0, ex - 8); /* big in [2^(ex-1), 2^ex): 8 bits */
                double tol = ulp + (double)(rank + 2) *
                                       ldexp(fabs(bf16_at(w, e)) + s * mag, -24);
                double diff = fabs((double)got - (double)want);
                if (!(diff <= tol))
                    fail_msg("TP %d/%d %s[%lld, %lld]: %.9g, PEFT merged %.9g (tol %.3g)", t, T,
                             name, (long long)gr, (long long)gc, got, want, tol);
                fd->worst_ulps = diff / ulp > fd->worst_ulps ? diff / ulp : fd->worst_ulps;
                fd->merged++;
                uint32_t u;
                memcpy(&u, &got, 4);
                u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even bf16 */
                u &= 0xffff0000u;
                float rounded;
                memcpy(&rounded, &u, 4);
                fd->rounded_apart += rounded != want;
            }
    ref_model_free(&m);
    free(buf);
    return 0;
}

static int check_workers(const h_run *r, const fixture *f, int T, int merged, found *fd)
{
    for (int t = 0; t < T; t++)
        if (check_worker(r, f, T, t, merged, fd))
            return 77;
    return 0;
}

static void sync_fixture(int T)
{
    fixture f;
    fixture_open(&f);
    h_run r;
    rlb_client *c;
    assert_int_equal(h_start_config(&r, RLB_SYNC_PAUSE, &f.cfg), 0);
    assert_int_equal(h_workers(&r, 1, (uint32_t)T), 0);
    assert_int_equal(h_connect(&r, 0, 1, &c), 0);
    assert_int_equal(h_wait_workers(&r, c, (uint32_t)T, 1), 0);
    register_fixture(c, &f);
    if (rlb_publish(c, 1, NULL))
        fail_msg("publish: %s", rlb_last_error(c));
    found fd = {0};
    if (check_workers(&r, &f, T, 1, &fd)) {
        skipped = 1;
    } else {
        printf("TP %d: %llu merged elements, at most %.3f bf16 ulps from PEFT's merge; %llu "
               "round to another bf16 value\n", T, (unsigned long long)fd.merged,
               fd.worst_ulps, (unsigned long long)fd.rounded_apart);
        assert_true(fd.merged > 0);
        /* Adapters taken back: the base, bit for bit. */
        assert_int_equal(rlb_unregister_lora(c, NULL, 0), 0);
        assert_int_equal(rlb_publish(c, 2, NULL), 0);
        assert_int_equal(check_workers(&r, &f, T, 0, &fd), 0);
    }
    rlb_close(c);
    assert_int_equal(h_stop(&r, NULL), 0);
    fixture_close(&f);
}

static void test_tp1(void **state)
{
    (void)state;
    sync_fixture(1);
}

static void test_tp2(void **state)
{
    (void)state;
    sync_fixture(2);
}

int main(void)
{
    if (access(FIXTURE "/merged.safetensors", R_OK) != 0) {
        printf("skip: %s/merged.safetensors is not there yet; generate the fixture with "
               "python3 scripts/make_peft_fixture.py (needs torch, transformers, peft)\n",
               FIXTURE);
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_tp1, h_teardown),
        cmocka_unit_test_teardown(test_tp2, h_teardown),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    return failed ? failed : skipped ? 77 : 0;
}
