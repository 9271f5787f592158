/* fuzz_config.c: libFuzzer target for the HF config.json parser.
 *
 * Feeds arbitrary bytes to rlb__config_parse. Beyond "no crash, no leak, no undefined
 * behaviour": every failure leaves a message, and every config it accepts passes
 * rlb__config_validate, so downstream code (TP layout, planner) can trust its sizes.
 *
 * Build: CC=clang cmake -DRLB_FUZZ=ON; run: fuzz_config corpus-dir seed-dir.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    rlb_model_config cfg;
    char err[256];
    err[0] = 0;
    int rc = rlb__config_parse((const char *)data, size, &cfg, err, sizeof(err));
    if (strlen(err) >= sizeof(err))
        abort();
    if (rc < 0) {
        if (!err[0] || (rc != RLB_EINVAL && rc != RLB_EUNSUPPORTED))
            abort();
        return 0;
    }
    if (rlb__config_validate(&cfg, NULL, 0) != 0)
        abort();
    return 0;
}
