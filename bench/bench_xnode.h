/* bench_xnode.h: the parts of rlb-bench-xnode (bench_xnode.c: the transport against TCP;
 * bench_xnode_commit.c: the commit's latency on two nodes against one; bench_xnode_nccl.c,
 * in builds with the NCCL transport: GPU memory between two GPUs against an all-gather). */
#ifndef RLB_BENCH_XNODE_H
#define RLB_BENCH_XNODE_H

#include <stddef.h>

/* Runs the commit benchmark over `versions` versions per job and prints its table. Returns
 * the exit status. */
int rlb__bench_xnode_commit(int versions);

/* Runs the NCCL benchmark (bytes in chunks, best of runs) and prints its table. Returns the
 * exit status. */
int rlb__bench_xnode_nccl(size_t bytes, size_t chunk, int runs);

#endif /* RLB_BENCH_XNODE_H */
