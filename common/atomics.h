/* atomics.h: the only way rlbridge touches memory shared between threads or processes.
 *
 * Every release store names, at its call site, the acquire load it pairs with and what it
 * publishes; relaxed accesses are for values whose ordering does not matter (heartbeats,
 * statistics). The wrappers work on plain integer fields of shared-memory structs, so the
 * layout of a segment stays a fixed-width wire format. GCC/Clang __atomic builtins are
 * lock-free for 4- and 8-byte aligned words on every target we build for.
 */
#ifndef RLB_COMMON_ATOMICS_H
#define RLB_COMMON_ATOMICS_H

#include <stdint.h>

#define rlb_load_acquire(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define rlb_store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define rlb_load_relaxed(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define rlb_store_relaxed(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
/* Sequentially consistent read-modify-write and fence, for the sleep/wake handshake where
 * a store must be ordered before a later load of a different word (Dekker pattern). */
#define rlb_fetch_add(p, v) __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)
#define rlb_exchange(p, v) __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)
#define rlb_fence_seq_cst() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* Spin-loop hint: lets the sibling hyper-thread run while we poll. */
static inline void rlb_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

#endif /* RLB_COMMON_ATOMICS_H */
