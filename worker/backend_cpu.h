/* backend_cpu.h: the CPU engine backend (worker/ebackend.h) — float32 weights read in place
 * from the worker's weight buffer, OpenBLAS matrix products, the ops of kernels/cpu/ops.h,
 * host float32 KV cache, TP collectives over shared memory (common/tp_comm.h).
 *
 * Post-load processing (quant = int8): qkv, o, gate_up, down and the LM head are quantized
 * per output row (rlb__quant_int8_rows) into buffers allocated once at creation; the matrix
 * products then read the int8 copies. Embedding, norms and biases stay float32. Running
 * post-load processing twice gives the same bytes as once.
 *
 * It is the reference every other backend is tested against.
 */
#ifndef RLB_WORKER_BACKEND_CPU_H
#define RLB_WORKER_BACKEND_CPU_H

#include <stdint.h>

#include "model/tp_layout.h"
#include "worker/ebackend.h"
#include "common/tp_comm.h"

/* An int8 copy of one local matrix. */
typedef struct rlb_i8_weight {
    int8_t *q;      /* [rows * cols], inside the backend's arena */
    float *scale;   /* [rows] */
    int64_t rows;   /* output rows */
    int64_t cols;   /* input columns */
} rlb_i8_weight;

/* Creates the CPU backend of rank comm->rank over `weights` (layout->total_bytes, float32,
 * borrowed, only read). Allocates the int8 buffers when quant is int8 and runs post-load
 * processing once. Returns 0, RLB_EINVAL (layout and comm disagree, NULL weights, a quant
 * the CPU does not do), RLB_EDTYPE (buffer not float32), RLB_EUNSUPPORTED (rope type) or
 * RLB_ENOMEM. */
int rlb__ebackend_cpu_create(const rlb_tp_layout *layout, const void *weights,
                             rlb_tp_comm *comm, rlb_quant quant, rlb_ebackend **out);
/* The int8 copies post-load processing writes (tests hash them): *n entries. */
const rlb_i8_weight *const *rlb__ebackend_cpu_i8(const rlb_ebackend *b, int64_t *n);

#endif /* RLB_WORKER_BACKEND_CPU_H */
