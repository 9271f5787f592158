/* fuzz_xnode_meta.c: libFuzzer target for the registration blob of another node
 * (bridge/xnode_meta.h), which arrives through the store from a bridge this one does not
 * control.
 *
 * Beyond "no crash, no leak, no undefined behaviour": a refused blob leaves the meta empty
 * and says RLB_EPROTO (or RLB_ENOMEM), and an accepted one encodes back to the very bytes
 * given (the encoding is canonical, so nothing in it went unchecked or was dropped).
 *
 * Build: CC=clang cmake -DRLB_FUZZ=ON; run: fuzz_xnode_meta corpus-dir seed-dir. Seeds:
 * `test_xnode_meta --write-corpus DIR`.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bridge/xnode_meta.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const xn_meta zero;
    xn_meta m;
    int rc = xn_meta_decode(data, size, &m);
    if (rc != 0) {
        if ((rc != RLB_EPROTO && rc != RLB_ENOMEM) || memcmp(&m, &zero, sizeof(m)) != 0)
            abort();
        return 0;
    }
    xbuf w = {0};
    xn_meta_encode(&m, &w);
    if (w.oom || w.len != size || (size && memcmp(w.p, data, size) != 0))
        abort();
    free(w.p);
    xn_meta_free(&m);
    return 0;
}
