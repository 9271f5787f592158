/* xnode.h: the bridges of a multi-node job (DESIGN §9), seen from the rest of the bridge.
 *
 * One bridge per node serves the trainer ranks of its node. A version v goes:
 *   1. every local rank published v (sync.c) -> br_xnode_begin: the node's registrations
 *      (names, dtypes, shapes, FSDP layout, buffer sizes) and its workers' target go to the
 *      xnode thread, which publishes them in the rendezvous store when they changed;
 *   2. the gate: each node adds itself to v's gate; the last one opens it, or a node that
 *      aborts first closes it, so every node agrees whether the exchange runs at all. A
 *      version runs in attempts (a republished v after an abort is a new one), and a node
 *      never joins an attempt twice: one that left an opened attempt waits until node 0
 *      settled it and named the next. Waiting at the gate is bounded by liveness only (the
 *      other bridges beat): a node whose trainers restart slowly is alive, not stalled;
 *   3. every node builds the same global source and every node's plan, and from the plans
 *      the byte ranges each node needs of each other node's buffers: it sends what its own
 *      ranks hold to the nodes that need it and receives what its workers need, in chunks,
 *      into a bounded staging that the local plan reads as sources; a plan with LoRA
 *      merges keeps a whole copy of what it reads instead, from one version to the next,
 *      and there a sender sends a manifest first and then only the chunks whose bytes the
 *      receiver does not hold yet (it says in the store which attempt its staging holds):
 *      after the first version only the adapters cross (DESIGN §10, xnode_delta.h);
      trainer tensors in GPU memory cross through NCCL instead of UCX, as one group per
      version into a whole staging on the GPU, the sends ordered after the trainers'
      publish events; there the chunks are hashed on the GPU and the manifests go through
      the store (xnode.c: choose_xport, connect_gpu, digest_sends, manifest_from);
 *      The exchange's no-progress bound (RLB_PEER_TIMEOUT_MS + 1 s without a completed
 *      transfer) runs only once every node has posted its transfers; a node that cannot
 *      (its plan failed, say) says so in the store and the others stop at once; one whose
 *      exchange ended with sends pending waits until every node ended its own, so no late
 *      receive reads trainer memory the bridge has let go;
 *   4. the local sync, pipelined with the exchange: (pause mode: generation drained
 *      before the gate) the plan is cut at chunk boundaries; its ops on local memory run at
 *      once, each chunk's as soon as it arrived (waves of the executor, br_xnode_pump), and
 *      a chunk's slot takes a later chunk once its ops ran; then load as on one node;
 *   5. two-phase commit: every node writes prepared (or its abort) in the store, node 0
 *      decides commit or abort for all, and every node acts on that outcome. Every attempt
 *      whose gate opened ends here, whatever failed after the gate. A node that prepared
 *      no longer aborts on its own (a local trainer that dies then only misses its synced
 *      message), so no node commits a version another one aborted.
 * The store and the transport are the xnode thread's alone (the loop never blocks on
 * them); the loop learns of its progress by polling (br_xnode_poll, each loop turn), woken
 * through an eventfd (br_xnode_fd) whenever the thread reports.
 * Dead peers: the launchers write the job's "abort" key when a bridge or a launcher dies,
 * and the bridges beat in the store; a wait gives up once a peer's beat is older than
 * RLB_PEER_TIMEOUT_MS, or the job's abort key is set.
 */
#ifndef RLB_BRIDGE_XNODE_H
#define RLB_BRIDGE_XNODE_H

#include <stdint.h>

typedef struct bridge bridge;
typedef struct br_xnode br_xnode;

/* Starts the xnode thread when the bridge is one node of several (opts->nnodes > 1): it
 * connects to the store and to every other node's bridge in the background. Returns 0 (also
 * on a single node), RLB_EINVAL (bad options), RLB_EUNSUPPORTED (no transport in this
 * build) or RLB_ENOMEM. */
int br_xnode_start(bridge *b);
/* Stops and joins the thread, frees everything. */
void br_xnode_stop(bridge *b);
/* The eventfd the thread writes when it has news for the loop (in the loop's poll set;
 * the loop empties it), or -1 on a single node. */
int br_xnode_fd(const bridge *b);
/* 1 when trainer rank `rank` publishes to another node's bridge. */
int br_xnode_remote_rank(const bridge *b, uint32_t rank);
/* Every local rank published v: hands v to the thread (sync -> XNODE). Returns 1 when the
 * sync moved on (started, or aborted at once), 0 while the thread still finishes the last
 * version (try again). */
int br_xnode_begin(bridge *b, uint64_t v);
/* XNODE: 1 when the exchange started and the node's plan is installed (go on with the
 * copy, br_xnode_pump), 0 while it has not, -1 when the version was aborted. */
int br_xnode_poll(bridge *b);
/* COPY, no run in flight: starts the next wave of the pipelined copy (the ops whose chunks
 * arrived) and returns 1; 0 while no op can run yet; 2 when every op ran (copy done); -1
 * when the version was aborted. */
int br_xnode_pump(bridge *b);
/* The executor's run was joined (b->copy.rc, .ms set): a wave's ops are done and the slots
 * of the chunks they read are free for the thread. No-op for another run. */
void br_xnode_joined(bridge *b);
/* LOAD with every worker loaded: 1 to commit now, 0 while the outcome is pending, -1 when
 * the version was aborted. On one node: 1. */
int br_xnode_commit_ready(bridge *b);
/* br_sync_abort's hook: tells the thread of a local abort, or (returns 1) defers it when the
 * node has prepared and only node 0's outcome may end the version (also once that outcome
 * is a commit the loop has not acted on yet). */
int br_xnode_abort_hook(bridge *b, int code, const char *text);
/* Chunk bytes this node sent to other nodes, received from them, and did not send because
 * the receiver held them (xnode_delta.h), in all; zeros on a single node. */
void br_xnode_bytes(const bridge *b, uint64_t *sent, uint64_t *received, uint64_t *skipped);
/* 1 while the thread works on a version (it may read the trainers' segments: keep them
 * mapped). */
int br_xnode_busy(const bridge *b);
/* Each loop turn: unmaps segments parked for the thread once it is done. */
void br_xnode_tick(bridge *b);

#endif /* RLB_BRIDGE_XNODE_H */
