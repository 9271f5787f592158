/* bench_xnode.h: the parts of rlb-bench-xnode (bench_xnode.c: the transport against TCP;
 * bench_xnode_commit.c: the commit's latency on two nodes against one; bench_xnode_nccl.c,
 * in builds with the NCCL transport: GPU memory between two GPUs against an all-gather). */
#ifndef RLB_BENCH_XNODE_H
#define RLB_BENCH_XNODE_H

#include <stddef.h>

/* One node of a two-node run: connects to the store at 127.0.0.1:port, runs, and (node 1)
 * writes its results to out_fd. Returns the process's exit status. */
typedef int (*rlb_bench_node_fn)(int node, int port, void *arg, int out_fd);

/* Runs node 0 and node 1 of `fn` (with `arg`) as two processes beside a store of run id
 * run_id served from here, waits for both and reads the two numbers node 1 wrote into *a
 * and *b. Returns 0, or 1 with what failed said on stderr after `who`. */
int rlb__bench_xnode_pair(const char *who, const char *run_id, rlb_bench_node_fn fn, void *arg,
                          double *a, double *b);

/* Runs the commit benchmark over `versions` versions per job and prints its table. Returns
 * the exit status. */
int rlb__bench_xnode_commit(int versions, int lora);

/* Runs the NCCL benchmark (bytes in chunks, best of runs) and prints its table. Returns the
 * exit status. */
int rlb__bench_xnode_nccl(size_t bytes, size_t chunk, int runs);

#endif /* RLB_BENCH_XNODE_H */
