/* cmds.h: the subcommands of the `rlb` command, one X(...) line each.
 *
 * X(name, summary): `rlb name ...` calls `int rlb__cmd_name(int argc, char **argv)`, defined
 * in launch/cmd_name.c, with argv[0] = "name". It returns the process exit status: 0 on
 * success, 1 on a runtime failure, 2 on bad usage. To add a command, append one line here
 * and add its file.
 */
#ifndef RLB_LAUNCH_CMDS_H
#define RLB_LAUNCH_CMDS_H

#define RLB_COMMANDS(X) \
    X(generate, "generate from a HF checkpoint directory") \
    X(bridge, "run the rlb-bridge daemon (CPU backend)") \
    X(worker, "run one rlb-worker: a TP rank of a replica, CPU backend") \
    X(demo, "start a bridge and 2 workers (CPU, tiny model) and train it with the toy trainer") \
    X(doctor, "check shared memory, socket directory, stale state, GPU, CUDA IPC, NCCL") \
    X(launch, "torchrun-compatible launcher: this node's bridge and workers, then the trainers") \
    X(stress, "every process under load and seeded faults, checking the invariants (DESIGN 11)") \

#define RLB_DECLARE_CMD(name, summary) int rlb__cmd_##name(int argc, char **argv);
RLB_COMMANDS(RLB_DECLARE_CMD)
#undef RLB_DECLARE_CMD

#endif /* RLB_LAUNCH_CMDS_H */
