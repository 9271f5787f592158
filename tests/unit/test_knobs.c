/* test_knobs: the knob table (common/env.h) against README "Knobs": every knob has its row
 * there with the table's default, and every row names a knob of the table, so neither can
 * gain an entry the other lacks. Also the reading of a knob that must be positive: a value
 * that is not a number, not positive or too large gives the default.
 *
 * Run: test_knobs README.md
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/env.h"

static const char *readme_path;

/* The text of README's "## Knobs" section (to free). */
static char *knobs_section(void)
{
    FILE *f = fopen(readme_path, "r");
    assert_non_null(f);
    static char text[1 << 20];
    size_t n = fread(text, 1, sizeof(text) - 1, f);
    fclose(f);
    text[n] = 0;
    char *start = strstr(text, "\n## Knobs\n");
    assert_non_null(start);
    start += 1;
    char *end = strstr(start + 3, "\n## ");
    size_t len = end ? (size_t)(end - start) : strlen(start);
    char *section = malloc(len + 1);
    assert_non_null(section);
    memcpy(section, start, len);
    section[len] = 0;
    return section;
}

static void test_readme_lists_every_knob(void **state)
{
    (void)state;
    char *section = knobs_section();
    const rlb_env_entry *t = rlb__env_table();
    for (int i = 0; i < RLB_KNOB_COUNT_; i++) {
        char row[160];
        snprintf(row, sizeof(row), "\n| `%s` | %s |", t[i].name, t[i].def[0] ? t[i].def : "(empty)");
        if (!strstr(section, row))
            fail_msg("README \"Knobs\" has no row starting '%s'", row + 1);
    }
    /* Every row names a knob of the table. */
    int rows = 0;
    for (const char *p = strstr(section, "\n| `"); p; p = strstr(p + 1, "\n| `")) {
        const char *name = p + 4, *end = strchr(name, '`');
        assert_non_null(end);
        int known = 0;
        for (int i = 0; i < RLB_KNOB_COUNT_; i++)
            known |= strlen(t[i].name) == (size_t)(end - name) &&
                     !strncmp(t[i].name, name, (size_t)(end - name));
        if (!known)
            fail_msg("README \"Knobs\" lists %.*s, which common/env.h does not declare",
                     (int)(end - name), name);
        rows++;
    }
    assert_int_equal(rows, RLB_KNOB_COUNT_);
    free(section);
}

static void test_positive_knob(void **state)
{
    (void)state;
    const char *def = rlb__env_table()[RLB_KNOB_WAIT_SLICE_MS].def;
    int want = atoi(def);
    assert_true(want > 0);
    const char *bad[] = {"-5", "0", "ten", "99999999999", ""};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        setenv("RLB_WAIT_SLICE_MS", bad[i], 1);
        if (rlb__env_positive(RLB_KNOB_WAIT_SLICE_MS) != want)
            fail_msg("RLB_WAIT_SLICE_MS=%s: %d, want the default %d", bad[i],
                     rlb__env_positive(RLB_KNOB_WAIT_SLICE_MS), want);
    }
    setenv("RLB_WAIT_SLICE_MS", "7", 1);
    assert_int_equal(rlb__env_positive(RLB_KNOB_WAIT_SLICE_MS), 7);
    unsetenv("RLB_WAIT_SLICE_MS");
    assert_int_equal(rlb__env_positive(RLB_KNOB_WAIT_SLICE_MS), want);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_knobs README.md\n");
        return 2;
    }
    readme_path = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_readme_lists_every_knob),
        cmocka_unit_test(test_positive_knob),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
