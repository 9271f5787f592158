/* fuzz_ring.h: the input format of the ring fuzzer (fuzz_ring.c), shared with the program
 * that writes its seed corpus (test_ring --write-corpus DIR).
 *
 * An input is a fuzz_ring_prefix followed by the bytes of a data area of FUZZ_RING_CAP
 * bytes (shorter input leaves the rest zero, longer input is cut). The fuzzer lays out a
 * fresh ring, writes the prefix's indices (and capacity, when non-zero) into its header,
 * copies the data area in, and drives one side of it as if the other side were hostile.
 */
#ifndef RLB_TESTS_FUZZ_RING_H
#define RLB_TESTS_FUZZ_RING_H

#include <stdint.h>

#define FUZZ_RING_CAP 4096u /* data area of the fuzzed ring: the smallest ring */

#define FUZZ_RING_RECV 1u     /* consumer reads with rlb__ring_recv (reassembly), not peek */
#define FUZZ_RING_PRODUCER 2u /* drive the producer against a hostile consumer index */
#define FUZZ_RING_PARTS 4u    /* consumer reads with rlb__ring_recv_part (in place) */

typedef struct fuzz_ring_prefix {
    uint64_t prod_index; /* written to the header's producer index */
    uint64_t cons_index; /* written to the header's consumer index */
    uint64_t capacity;   /* written to the header's capacity unless 0 */
    uint32_t mode;       /* FUZZ_RING_* bits */
    uint32_t param;      /* recv, parts: the receiver's max_msg; producer: seed of record
                            sizes */
} fuzz_ring_prefix;
_Static_assert(sizeof(fuzz_ring_prefix) == 32, "fuzz input prefix is 32 bytes");

#endif /* RLB_TESTS_FUZZ_RING_H */
