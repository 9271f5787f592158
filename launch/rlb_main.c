/* rlb_main.c: the `rlb` command. Dispatches `rlb <command> [args]` to the subcommands
 * listed in launch/cmds.h; `rlb`, `rlb help` and `rlb --help` list them.
 */
#include <stdio.h>
#include <string.h>

#include "common/log.h"
#include "launch/cmds.h"

typedef struct rlb_cmd {
    const char *name;                  /* what follows `rlb` */
    const char *summary;               /* one line for the listing */
    int (*run)(int argc, char **argv); /* argv[0] is the command's name */
} rlb_cmd;

#define RLB_CMD_ENTRY(name, summary) {#name, summary, rlb__cmd_##name},
static const rlb_cmd cmds[] = {RLB_COMMANDS(RLB_CMD_ENTRY){NULL, NULL, NULL}};
#undef RLB_CMD_ENTRY

static void usage(FILE *f)
{
    fprintf(f, "usage: rlb <command> [options]   (rlb <command> --help for its options)\n\n");
    for (const rlb_cmd *c = cmds; c->name; c++)
        fprintf(f, "  %-10s %s\n", c->name, c->summary);
}

int main(int argc, char **argv)
{
    rlb__log_init_default(RLB_LOG_LVL_WARN); /* daemons raise it to info */
    if (argc < 2 || !strcmp(argv[1], "help") || !strcmp(argv[1], "--help") ||
        !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    for (const rlb_cmd *c = cmds; c->name; c++)
        if (!strcmp(argv[1], c->name))
            return c->run(argc - 1, argv + 1);
    fprintf(stderr, "rlb: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
