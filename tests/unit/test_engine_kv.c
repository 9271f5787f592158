/* test_engine_kv: the paged KV cache's block accounting (worker/kvcache.c).
 *   - sizing: floor(budget / block bytes) blocks, a budget below one block refused;
 *   - reserve is all-or-nothing: on RLB_EAGAIN neither the table nor the free count moved;
 *   - fork shares the full blocks and copies the partial last one (same bytes, new id),
 *     or needs no new block when the prompt ends on a block boundary;
 *   - a random walk of reserve / fork / release over many tables, checked after every
 *     move against a model kept here: each block's reference count equals the number of
 *     tables naming it, free blocks are exactly those nobody names, no table names a block
 *     twice; and every table's slots keep the bytes written through it (a block handed to
 *     two owners would be overwritten);
 *   - sleep refuses while blocks are held, frees the storage, wake restores it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "rlb/rlb.h"
#include "worker/kvcache.h"

#define LAYERS 2
#define KVT 2
#define HD 8
#define BT 4 /* tokens per block */

static void test_sizing(void **state)
{
    (void)state;
    rlb_kvcache kv;
    uint64_t per = rlb__kv_block_bytes(LAYERS, KVT, HD, BT);
    assert_int_equal(per, 2 * LAYERS * KVT * BT * HD * sizeof(float));
    assert_int_equal(rlb__kv_init(&kv, LAYERS, KVT, HD, BT, 10 * per + per - 1), 0);
    assert_int_equal(kv.n_blocks, 10);
    assert_int_equal(kv.n_free, 10);
    assert_int_equal(rlb__kv_blocks_for(&kv, 0), 0);
    assert_int_equal(rlb__kv_blocks_for(&kv, 4), 1);
    assert_int_equal(rlb__kv_blocks_for(&kv, 5), 2);
    rlb__kv_free(&kv);
    assert_int_equal(rlb__kv_init(&kv, LAYERS, KVT, HD, BT, per - 1), RLB_ETOOBIG);
    assert_int_equal(rlb__kv_init(&kv, 0, KVT, HD, BT, per), RLB_EINVAL);
    assert_int_equal(rlb__kv_init(&kv, LAYERS, KVT, HD, 0, per), RLB_EINVAL);
}

static void test_reserve_all_or_nothing(void **state)
{
    (void)state;
    rlb_kvcache kv;
    assert_int_equal(rlb__kv_init(&kv, LAYERS, KVT, HD, BT,
                                  5 * rlb__kv_block_bytes(LAYERS, KVT, HD, BT)), 0);
    rlb_block_table a = {0}, b = {0};
    assert_int_equal(rlb__kv_reserve(&kv, &a, 9), 0); /* 3 blocks */
    assert_int_equal(a.n, 3);
    assert_int_equal(rlb__kv_reserve(&kv, &a, 12), 0); /* still 3 */
    assert_int_equal(a.n, 3);
    assert_int_equal(rlb__kv_reserve(&kv, &b, 4), 0);
    assert_int_equal(kv.n_free, 1);
    assert_int_equal(rlb__kv_reserve(&kv, &b, 12), RLB_EAGAIN); /* needs 2 more */
    assert_int_equal(b.n, 1);
    assert_int_equal(kv.n_free, 1);
    assert_int_equal(rlb__kv_reserve(&kv, &b, 8), 0);
    assert_int_equal(kv.n_free, 0);
    rlb__kv_release(&kv, &a);
    assert_int_equal(a.n, 0);
    assert_int_equal(kv.n_free, 3);
    rlb__kv_release(&kv, &b);
    assert_int_equal(kv.n_free, 5);
    rlb__kv_table_free(&a);
    rlb__kv_table_free(&b);
    rlb__kv_free(&kv);
}

static void fill_block(rlb_kvcache *kv, int32_t id, float base)
{
    for (int64_t l = 0; l < kv->n_layers; l++)
        for (int64_t i = 0; i < kv->block_floats; i++) {
            rlb__kv_k(kv, id, l)[i] = base + (float)(l * 1000 + i);
            rlb__kv_v(kv, id, l)[i] = -base - (float)(l * 1000 + i);
        }
}

static void test_fork(void **state)
{
    (void)state;
    rlb_kvcache kv;
    assert_int_equal(rlb__kv_init(&kv, LAYERS, KVT, HD, BT,
                                  4 * rlb__kv_block_bytes(LAYERS, KVT, HD, BT)), 0);
    rlb_block_table p = {0}, c = {0}, d = {0};
    assert_int_equal(rlb__kv_reserve(&kv, &p, 6), 0); /* one full, one partial */
    fill_block(&kv, p.ids[0], 1.0f);
    fill_block(&kv, p.ids[1], 2.0f);
    assert_int_equal(rlb__kv_fork(&kv, &c, &p, 6), 0);
    assert_int_equal(c.n, 2);
    assert_int_equal(c.ids[0], p.ids[0]);
    assert_true(c.ids[1] != p.ids[1]);
    assert_int_equal(kv.refs[p.ids[0]], 2);
    size_t bytes = LAYERS * (size_t)kv.block_floats * sizeof(float);
    assert_memory_equal(rlb__kv_k(&kv, c.ids[1], 0), rlb__kv_k(&kv, p.ids[1], 0), bytes);
    assert_memory_equal(rlb__kv_v(&kv, c.ids[1], 0), rlb__kv_v(&kv, p.ids[1], 0), bytes);
    assert_int_equal(kv.n_free, 1);
    /* The last free block goes to a second fork; a third finds none and changes nothing. */
    assert_int_equal(rlb__kv_fork(&kv, &d, &p, 6), 0);
    rlb_block_table e = {0};
    assert_int_equal(rlb__kv_fork(&kv, &e, &p, 6), RLB_EAGAIN);
    assert_int_equal(e.n, 0);
    assert_int_equal(kv.refs[p.ids[0]], 3);
    /* On a block boundary nothing is copied. */
    assert_int_equal(rlb__kv_fork(&kv, &e, &p, 4), 0);
    assert_int_equal(e.n, 1);
    assert_int_equal(kv.refs[p.ids[0]], 4);
    /* The parent leaves; the shared block stays with the children. */
    int32_t shared = p.ids[0];
    rlb__kv_release(&kv, &p);
    assert_int_equal(kv.refs[shared], 3);
    assert_int_equal(kv.n_free, 1);
    rlb__kv_release(&kv, &c);
    rlb__kv_release(&kv, &d);
    rlb__kv_release(&kv, &e);
    assert_int_equal(kv.n_free, 4);
    rlb__kv_table_free(&p);
    rlb__kv_table_free(&c);
    rlb__kv_table_free(&d);
    rlb__kv_table_free(&e);
    rlb__kv_free(&kv);
}

#define N_TABLES 12
#define N_BLOCKS 24

typedef struct walk {
    rlb_kvcache kv;
    rlb_block_table t[N_TABLES];
    int64_t tokens[N_TABLES]; /* positions each table covers */
    float stamp[N_TABLES];    /* value written into the table's private slots */
} walk;

/* Checks the invariants against counts taken from the tables themselves. */
static void check_walk(const walk *w)
{
    int refs[N_BLOCKS] = {0};
    for (int i = 0; i < N_TABLES; i++) {
        assert_int_equal(w->t[i].n, rlb__kv_blocks_for(&w->kv, w->tokens[i]));
        for (int64_t a = 0; a < w->t[i].n; a++) {
            refs[w->t[i].ids[a]]++;
            for (int64_t b = 0; b < a; b++)
                assert_true(w->t[i].ids[a] != w->t[i].ids[b]);
        }
    }
    int64_t used = 0;
    for (int b = 0; b < N_BLOCKS; b++) {
        assert_int_equal(w->kv.refs[b], refs[b]);
        used += refs[b] > 0;
    }
    assert_int_equal(w->kv.n_free + used, N_BLOCKS);
    for (int64_t f = 0; f < w->kv.n_free; f++)
        assert_int_equal(refs[w->kv.free_stack[f]], 0);
    /* A table's last block is private when partial: it still holds the table's stamp. */
    for (int i = 0; i < N_TABLES; i++)
        if (w->t[i].n && w->tokens[i] % BT)
            assert_true(rlb__kv_k(&w->kv, w->t[i].ids[w->t[i].n - 1], 0)[0] == w->stamp[i]);
}

static void stamp_last(walk *w, int i, float value)
{
    w->stamp[i] = value;
    if (w->t[i].n && w->tokens[i] % BT)
        rlb__kv_k(&w->kv, w->t[i].ids[w->t[i].n - 1], 0)[0] = value;
}

static void test_random_walk(void **state)
{
    (void)state;
    walk *w = calloc(1, sizeof *w);
    assert_int_equal(rlb__kv_init(&w->kv, LAYERS, KVT, HD, BT,
                                  N_BLOCKS * rlb__kv_block_bytes(LAYERS, KVT, HD, BT)), 0);
    uint64_t x = 12345;
    int eagain = 0, forks = 0;
    for (int step = 0; step < 20000; step++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        int i = (int)((x >> 33) % N_TABLES), op = (int)((x >> 45) % 4);
        int64_t grow = (int64_t)((x >> 50) % 7) + 1;
        if (op == 0 && w->tokens[i] > 0) {
            rlb__kv_release(&w->kv, &w->t[i]);
            w->tokens[i] = 0;
        } else if (op == 1 && w->tokens[i] == 0) {
            int src = (int)((x >> 20) % N_TABLES);
            if (src == i || w->tokens[src] == 0)
                continue;
            /* As the engine's prompt forks: the child takes all the source has written. */
            int rc = rlb__kv_fork(&w->kv, &w->t[i], &w->t[src], w->tokens[src]);
            if (rc == RLB_EAGAIN) {
                eagain++;
                assert_int_equal(w->t[i].n, 0);
            } else {
                assert_int_equal(rc, 0);
                w->tokens[i] = w->tokens[src];
                forks++;
                stamp_last(w, i, (float)step);
            }
        } else {
            int64_t before = w->t[i].n, free_before = w->kv.n_free;
            int rc = rlb__kv_reserve(&w->kv, &w->t[i], w->tokens[i] + grow);
            if (rc == RLB_EAGAIN) {
                eagain++;
                assert_int_equal(w->t[i].n, before);
                assert_int_equal(w->kv.n_free, free_before);
                continue;
            }
            assert_int_equal(rc, 0);
            /* A table only grows at its private end: a shared full block stays shared,
             * the partial one it writes into next is its own. */
            w->tokens[i] += grow;
            stamp_last(w, i, (float)step);
        }
        check_walk(w);
    }
    assert_true(eagain > 100 && forks > 100);
    for (int i = 0; i < N_TABLES; i++) {
        rlb__kv_release(&w->kv, &w->t[i]);
        rlb__kv_table_free(&w->t[i]);
    }
    assert_int_equal(w->kv.n_free, N_BLOCKS);
    rlb__kv_free(&w->kv);
    free(w);
}

static void test_sleep_wake(void **state)
{
    (void)state;
    rlb_kvcache kv;
    assert_int_equal(rlb__kv_init(&kv, LAYERS, KVT, HD, BT,
                                  3 * rlb__kv_block_bytes(LAYERS, KVT, HD, BT)), 0);
    rlb_block_table t = {0};
    assert_int_equal(rlb__kv_reserve(&kv, &t, 5), 0);
    assert_int_equal(rlb__kv_sleep(&kv), RLB_EINVAL);
    assert_non_null(kv.k);
    rlb__kv_release(&kv, &t);
    assert_int_equal(rlb__kv_sleep(&kv), 0);
    assert_null(kv.k);
    assert_null(kv.v);
    assert_int_equal(rlb__kv_wake(&kv), 0);
    assert_non_null(kv.k);
    assert_int_equal(kv.n_blocks, 3);
    assert_int_equal(rlb__kv_wake(&kv), 0); /* awake: nothing to do */
    assert_int_equal(rlb__kv_reserve(&kv, &t, 12), 0);
    fill_block(&kv, t.ids[2], 5.0f); /* the storage is really there (ASan) */
    rlb__kv_release(&kv, &t);
    rlb__kv_table_free(&t);
    rlb__kv_free(&kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sizing),
        cmocka_unit_test(test_reserve_all_or_nothing),
        cmocka_unit_test(test_fork),
        cmocka_unit_test(test_random_walk),
        cmocka_unit_test(test_sleep_wake),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
