/* fuzz_proto: libFuzzer target for the protocol decoder (common/proto_decode.c), built
 * with AddressSanitizer and UndefinedBehaviorSanitizer.
 *
 * Any input must decode or be refused with RLB_EPROTO and a text, never crash, hang or
 * allocate without bound. What decodes must re-encode, and that encoding must decode and
 * re-encode to the same bytes (the decoder accepts nothing the packer refuses). What is
 * refused must still yield an error reply that packs, as the bridge sends one back.
 *
 *   fuzz_proto -max_total_time=60 WORK_DIR tests/fuzz/corpus/proto
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Packs m into a heap buffer of its exact size; aborts when that fails. */
static uint8_t *pack_or_abort(const rlb_msg *m, size_t *len)
{
    size_t size;
    if (rlb__msg_packed_size(m, &size) != 0)
        abort();
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf || rlb__msg_pack(m, buf, size, len) != 0 || *len != size)
        abort();
    return buf;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    rlb_msg m, again;
    char err[256];
    int rc = rlb__msg_decode(data, size, &m, err, sizeof err);
    if (rc == 0) {
        size_t len1, len2;
        uint8_t *p1 = pack_or_abort(&m, &len1);
        if (rlb__msg_decode(p1, len1, &again, err, sizeof err) != 0)
            abort();
        uint8_t *p2 = pack_or_abort(&again, &len2);
        if (len1 != len2 || memcmp(p1, p2, len1) != 0)
            abort();
        rlb__msg_free(&again);
        rlb__msg_free(&m);
        free(p1);
        free(p2);
        return 0;
    }
    if ((rc != RLB_EPROTO && rc != RLB_ENOMEM) || err[0] == '\0' || m.arena)
        abort();
    rlb_msg reply;
    uint8_t out[1024];
    size_t len;
    rlb__msg_error_reply(data, size, rc, err, &reply);
    if (rlb__msg_pack(&reply, out, sizeof out, &len) != 0)
        abort();
    return 0;
}
