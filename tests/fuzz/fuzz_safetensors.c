/* fuzz_safetensors.c: libFuzzer target for the safetensors header parser.
 *
 * Feeds arbitrary bytes to rlb__st_parse as a whole file. Beyond "no crash, no leak, no
 * undefined behaviour" it checks what the parser promises on success, so a parser that
 * accepts a bad file fails here too: names sorted and unique, every tensor's byte size
 * equal to its shape times its dtype size, its bytes inside the buffer (each is read, so
 * ASan sees an overrun) and the tensors tiling the data area exactly.
 *
 * Build: CC=clang cmake -DRLB_FUZZ=ON; run: fuzz_safetensors corpus-dir seed-dir.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void require(int ok)
{
    if (!ok)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    rlb_st_header h;
    char err[256];
    err[0] = 0;
    int rc = rlb__st_parse(data, size, &h, err, sizeof(err));
    require(strlen(err) < sizeof(err));
    if (rc < 0) {
        require(err[0] != 0 && h.tensors == NULL);
        return 0;
    }
    uint64_t covered = 0;
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < h.n_tensors; i++) {
        const rlb_st_tensor *t = &h.tensors[i];
        if (i)
            require(strcmp(h.tensors[i - 1].name, t->name) < 0);
        uint64_t n = rlb_dtype_size(t->dtype);
        require(n != 0 && t->ndim >= 0 && t->ndim <= RLB_ST_MAX_DIMS);
        for (int d = 0; d < t->ndim; d++)
            require(t->shape[d] >= 0 && !__builtin_mul_overflow(n, (uint64_t)t->shape[d], &n));
        require(n == t->nbytes);
        require(t->file_offset >= h.data_start && t->file_offset <= size &&
                t->nbytes <= size - t->file_offset);
        require((const uint8_t *)t->data == data + t->file_offset);
        if (t->nbytes)
            sink ^= ((const uint8_t *)t->data)[0] ^ ((const uint8_t *)t->data)[t->nbytes - 1];
        covered += t->nbytes;
    }
    require(h.data_start + h.data_bytes == size && covered == h.data_bytes);
    (void)sink;
    rlb__st_header_free(&h);
    return 0;
}
