/* xnode_meta.h: the registration blob ("meta") one node's bridge publishes to the others
 * through the store (xnode.c), so every node plans with every node's tensors.
 *
 * The blob is little-endian: u32 magic, version, tp_size, replicas, weight dtype, memory
 * (XN_MEM_HOST: the buffers are host memory, or there are none; XN_MEM_GPU: device memory),
 * n_buffers, n_tensors; u64 bytes of each buffer; per tensor: u16 name length, name, u8
 * dtype, kind, ndim, pad (0), u32 fsdp rank, world, unit, buffer, u64 offset, length, i64
 * shape[ndim]; FSDP1: u32 entries, each u16 name length (0 = padding), name, u8 ndim, i64
 * shape[2], u64 numel; then u32 adapters, each u16 name length, the adapted weight's name,
 * u32 rank, f32 scale: the LoRA adapters the node's ranks declared (every node plans with
 * all of them, so every node builds the same plans).
 *
 * Invariants: the encoding is canonical. A blob xn_meta_decode accepts encodes back to the
 * same bytes (fuzz_xnode_meta checks it): names hold no NUL, the pad byte is 0, every enum
 * is one of its values, every length is checked against the blob before it is used. A blob
 * that breaks any of it is RLB_EPROTO, whatever node sent it.
 *
 * Check: tests/unit/test_xnode_meta.c (round trip, every truncation, corrupted fields),
 * tests/fuzz/fuzz_xnode_meta.c.
 */
#ifndef RLB_BRIDGE_XNODE_META_H
#define RLB_BRIDGE_XNODE_META_H

#include <stddef.h>
#include <stdint.h>

#include "bridge/bridge_int.h"

#define XN_MAGIC 0x584e4252u /* "RBNX" */
#define XN_META_VERSION 3u

/* Where a node's source buffers are. */
#define XN_MEM_HOST 0u
#define XN_MEM_GPU 1u

/* A growing byte buffer; oom is set (and later puts ignored) when it cannot grow. */
typedef struct xbuf {
    uint8_t *p;
    size_t len, cap;
    int oom;
} xbuf;

/* A LoRA adapter a node's ranks declared. */
typedef struct xn_adapter {
    char *target;   /* the adapted weight */
    uint32_t rank;
    float scale;
} xn_adapter;

/* One node's registrations and workers, decoded from its meta. */
typedef struct xn_meta {
    uint32_t tp_size, replicas; /* the node's workers */
    rlb_dtype wdt;              /* their weight dtype */
    uint32_t mem;               /* XN_MEM_HOST or XN_MEM_GPU: where its buffers are */
    uint32_t n_bufs;            /* its source buffers */
    uint64_t *buf_bytes;        /* [n_bufs] */
    uint32_t n_tensors;
    br_tensor *tensors;         /* seg = local buffer index; mem = RLB_MEM_HOST_SHM */
    uint32_t n_adapters;
    xn_adapter *adapters;       /* its ranks' LoRA declarations */
} xn_meta;

/* The blob's parts, in order: the header, the buffers' sizes, the tensors (t's bytes in
 * local buffer `buf`), the adapter count, the adapters. */
void xn_meta_put_header(xbuf *w, uint32_t tp_size, uint32_t replicas, rlb_dtype wdt,
                        uint32_t mem, uint32_t n_bufs, uint32_t n_tensors);
void xn_meta_put_u32(xbuf *w, uint32_t v);
void xn_meta_put_u64(xbuf *w, uint64_t v);
void xn_meta_put_tensor(xbuf *w, const br_tensor *t, uint32_t buf);
void xn_meta_put_adapter(xbuf *w, const char *target, uint32_t rank, float scale);
/* Appends n bytes (n == 0: data may be NULL). */
void xn_meta_put(xbuf *w, const void *data, size_t n);

/* Encodes m whole into w (what decoding the result gives back). */
void xn_meta_encode(const xn_meta *m, xbuf *w);

/* Decodes a blob. Returns 0, RLB_EPROTO (malformed) or RLB_ENOMEM; m is empty on failure. */
int xn_meta_decode(const void *data, size_t len, xn_meta *m);
void xn_meta_free(xn_meta *m);

#endif /* RLB_BRIDGE_XNODE_META_H */
