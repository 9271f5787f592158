/* bench_xnode.h: the parts of rlb-bench-xnode (bench_xnode.c: the transport against TCP;
 * bench_xnode_commit.c: the commit's latency on two nodes against one). */
#ifndef RLB_BENCH_XNODE_H
#define RLB_BENCH_XNODE_H

/* Runs the commit benchmark over `versions` versions per job and prints its table. Returns
 * the exit status. */
int rlb__bench_xnode_commit(int versions);

#endif /* RLB_BENCH_XNODE_H */
