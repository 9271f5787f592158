/* stress.h: the pieces of `rlb stress` (launch/cmd_stress.c) that its roles share.
 *
 * `rlb stress` runs every process of a node for real and re-executes itself for the roles
 * it needs (`rlb stress --role trainer|client|checker ...`); this header is what they have
 * in common:
 *   - the fault schedule: a pure function of (seed, duration, fault kinds), so a seed
 *     replays the same faults at the same moments (stress_sched.c);
 *   - the weights of a version: a pure function of (seed, version, parameter, element),
 *     laid out in a trainer rank's shards (FSDP2 rows or FSDP1 flat units, chosen per unit)
 *     or in a TP-1 worker buffer for the checker's reference engine, and the FNV-1a
 *     checksum of the exact bytes (stress_weights.c);
 *   - the records the roles send to the supervisor over a pipe (one write each, smaller
 *     than PIPE_BUF, so records from one child never interleave).
 */
#ifndef RLB_LAUNCH_STRESS_H
#define RLB_LAUNCH_STRESS_H

#include <stddef.h>
#include <stdint.h>

#include "common/clock.h"
#include "model/params.h"
#include "model/tp_layout.h"
#include "rlb/rlb.h"

/* ---- Fault schedule ------------------------------------------------------------------ */

typedef enum rlb_stress_fault {
    RLB_FAULT_KILL_BRIDGE = 0, /* kill -9 of the bridge; it is restarted, everyone rejoins */
    RLB_FAULT_KILL_WORKER,     /* kill -9 of a worker; its replica is restarted and heals */
    RLB_FAULT_KILL_TRAINER,    /* kill -9 of a trainer rank (often mid-publish) */
    RLB_FAULT_KILL_CLIENT,     /* kill -9 of a generating client with requests in flight */
    RLB_FAULT_STOP_WORKER,     /* SIGSTOP of a worker past RLB_PEER_TIMEOUT_MS, then
                                  SIGCONT or kill -9 */
    RLB_FAULT_POISON,          /* the next version carries a NaN: it must abort */
    RLB_FAULT_GARBAGE,         /* a hostile client commits random bytes as a record */
    RLB_FAULT_TRUNCATED,       /* a hostile client commits a cut message, or a record
                                  header announcing more bytes than it committed */
    RLB_FAULT_DISCONNECT,      /* a hostile client leaves mid-message (after the first
                                  fragment), or right after submitting a request */
    RLB_FAULT_TRUNCATE_SEG,    /* kill -9 of a trainer rank whose next incarnation truncates
                                  its shard segment under the bridge (rlb_stress_truncate) */
    RLB_FAULT_COUNT_
} rlb_stress_fault;

#define RLB_FAULTS_ALL ((1u << RLB_FAULT_COUNT_) - 1u)

typedef struct rlb_stress_event {
    int64_t at_ms;   /* from the start of the run */
    uint32_t kind;   /* rlb_stress_fault */
    uint32_t target; /* which process of its kind (taken modulo those alive) */
    uint32_t arg;    /* kind-specific randomness (stop length, variant) */
} rlb_stress_event;

/* The fault's name as --faults and the report spell it ("kill_bridge", ...), or "?". */
const char *rlb__stress_fault_name(uint32_t kind);
/* Parses a comma-separated list of fault names, "all" or "none" into a bit mask. Returns 0,
 * or RLB_EINVAL with the unknown name in err. */
int rlb__stress_parse_faults(const char *list, uint32_t *mask, char *err, size_t errlen);
/* Mean events per minute of each kind in a schedule. */
double rlb__stress_fault_rate(uint32_t kind);
/* The schedule of a run: events of the kinds in `mask` over [0, duration_ms), in time
 * order, drawn from `seed` alone (Poisson arrivals per kind). Returns the number of
 * events and sets *out (free it), or RLB_ENOMEM / RLB_EINVAL. */
int rlb__stress_schedule(uint64_t seed, int64_t duration_ms, uint32_t mask,
                         rlb_stress_event **out);

/* What a trainer rank started for the truncate_seg fault does with its shard segment. */
typedef enum rlb_stress_truncate {
    RLB_TRUNCATE_NONE = 0, /* nothing: an honest rank */
    RLB_TRUNCATE_UNSEALED, /* its shards lie in a memfd without seals, which it truncates to
                              0 after the register: the bridge must have refused it with
                              RLB_EPERM naming the seals, and never touch it */
    RLB_TRUNCATE_SEALED,   /* its shards lie in rlb_alloc_host memory, which it tries to
                              truncate to 0 once registered: that must fail with EPERM */
} rlb_stress_truncate;

/* The variant's name as --truncate spells it ("unsealed", "sealed"; "none"), or "?". */
const char *rlb__stress_truncate_name(uint32_t truncate);

/* ---- Randomness -------------------------------------------------------------------------- */

/* splitmix64: the next value of the stream *s. */
uint64_t rlb__stress_rand(uint64_t *s);
/* A value in [0, n) (n > 0). */
uint32_t rlb__stress_below(uint64_t *s, uint32_t n);
/* A stream key from a seed and up to three labels. */
uint64_t rlb__stress_key(uint64_t seed, uint64_t a, uint64_t b, uint64_t c);

/* ---- Weights ---------------------------------------------------------------------------- */

/* The model a stress run trains: the built-in tiny Llama (`rlb bridge --tiny`). */
const rlb_param_list *rlb__stress_params(void);
/* Element i (row-major) of parameter p in version v. Norms stay near 1, the rest is
 * uniform in [-0.2, 0.2], so greedy tokens change with every version. */
float rlb__stress_weight(uint64_t seed, uint64_t v, int64_t p, uint64_t i);

#define RLB_STRESS_ALIGN 4 /* FSDP1 use_orig_params alignment (16 bytes of F32) */

/* A trainer rank's shards. A unit is the FSDP1 wrap unit of a parameter (0: embed, final
 * norm, lm_head; 1 + l: layer l); bit u of `fsdp1_units` makes unit u one FSDP1
 * FlatParameter, the other units are FSDP2 Shard(0) parameters. */
typedef struct rlb_stress_shards {
    uint32_t rank, world;    /* this rank of the trainer world (= the FSDP group) */
    uint32_t fsdp1_units;    /* bit u: unit u is FSDP1 */
    size_t floats;           /* floats of the rank's memory (all shards, aligned) */
} rlb_stress_shards;

/* Sets up s for rank/world with the FSDP1 unit mask. */
void rlb__stress_shards_init(rlb_stress_shards *s, uint32_t rank, uint32_t world,
                             uint32_t fsdp1_units);
/* Writes version v's shards into mem (s->floats floats). */
void rlb__stress_shards_fill(const rlb_stress_shards *s, uint64_t seed, uint64_t v, float *mem);
#define RLB_STRESS_MAX_TENSORS 64 /* tensor descriptions of one rank's shards at most */
#define RLB_STRESS_MAX_ENTRIES 64 /* FSDP1 entries of one unit at most */

/* The tensor descriptions of the shards in mem, for rlb_register: fills desc (room for
 * RLB_STRESS_MAX_TENSORS) and, for FSDP1 units, entries (RLB_STRESS_MAX_ENTRIES per unit,
 * unit-major), and returns how many descriptions. */
uint32_t rlb__stress_shards_describe(const rlb_stress_shards *s, const float *mem,
                                     rlb_tensor_desc *desc, rlb_fsdp1_entry *entries);
/* Index in mem of one element of a parameter this rank holds (the poison target), chosen
 * by pick; never padding. */
size_t rlb__stress_shards_pick(const rlb_stress_shards *s, uint64_t pick);

/* FNV-1a 64 of len bytes. */
uint64_t rlb__stress_fnv(const void *data, size_t len);

/* Writes version v's weights into a TP rank's float32 buffer (layout->total_bytes, zeroed
 * where nothing lands: the vocabulary padding). */
void rlb__stress_tp_fill(const rlb_tp_layout *layout, uint64_t seed, uint64_t v, float *buf);

/* ---- Records to the supervisor ------------------------------------------------------------ */

typedef enum rlb_stress_rec_kind {
    RLB_REC_READY = 1,   /* trainer: connected and registered (or refused: truncate_seg) */
    RLB_REC_PUBLISH,     /* trainer: answer to a publish command */
    RLB_REC_SUBMIT,      /* client: a request went out */
    RLB_REC_ANSWER,      /* client: a request was answered (done or failed) */
    RLB_REC_PROBE,       /* checker: a probe compared with the reference */
    RLB_REC_CONNECTED,   /* client / checker: (re)connected to a bridge */
    RLB_REC_SLEEP,       /* client: put the workers to sleep and woke them */
} rlb_stress_rec_kind;

typedef enum rlb_probe_verdict {
    RLB_PROBE_OK = 0,       /* tokens equal, logprobs within tolerance */
    RLB_PROBE_NEAR_TIE = 1, /* a token differs where the two likeliest tokens are tied
                               within the tolerance (rounding, not weights) */
    RLB_PROBE_MISMATCH = 2, /* the worker's weights are not the version it stamped */
} rlb_probe_verdict;

typedef struct rlb_stress_rec {
    uint32_t kind;      /* rlb_stress_rec_kind */
    int32_t rc;         /* 0 or the RLB_E* code of the call (READY: of the register) */
    uint32_t flags;     /* RLB_REC_F_* */
    uint32_t count;     /* PROBE: verdict; ANSWER: samples; READY of truncate_seg: errno of
                           the truncation, 0 when the segment shrank */
    uint64_t version;   /* PUBLISH: the version; PROBE: the version the probe waited for */
    uint64_t vmin, vmax; /* ANSWER / PROBE: weight versions stamped on the samples */
    uint64_t checksum;  /* PUBLISH: FNV-1a of the bytes published */
    double ms;          /* how long the call took */
    char text[160];     /* the error's sentence (rlb_last_error), or what was wrong */
} rlb_stress_rec;

#define RLB_REC_F_BAD_SHAPE 1u   /* ANSWER: samples missing, repeated or out of order, or a
                                    finish reason that contradicts the tokens */
#define RLB_REC_F_UNNAMED 2u     /* ANSWER / PUBLISH: a failure without a named error */
#define RLB_REC_F_EXPECT_REFUSAL 4u /* ANSWER: the request was invalid on purpose */
#define RLB_REC_F_POISONED 8u    /* PUBLISH: the version carried a NaN */
#define RLB_REC_F_UNSEALED 16u   /* READY / PUBLISH: a rank of RLB_TRUNCATE_UNSEALED (its
                                    bytes are gone: no checksum) */
#define RLB_REC_F_SEALED 32u     /* READY: a rank of RLB_TRUNCATE_SEALED */

/* A command to a trainer (publish `version`) or to the checker (`version` committed). */
typedef struct rlb_stress_cmd {
    uint64_t version; /* the version */
    uint32_t poison;  /* trainer: write a NaN before publishing */
    uint32_t pick;    /* trainer: which element gets it */
} rlb_stress_cmd;

/* The fds a role reads commands from and writes records to (set up before exec). */
#define RLB_STRESS_CMD_FD 3
#define RLB_STRESS_REC_FD 4

/* Writes one record to RLB_STRESS_REC_FD. Returns 0 or -1 (the supervisor is gone). */
int rlb__stress_send(const rlb_stress_rec *r);
/* 1 when rc is a failure a caller can name: an RLB_E* code with a sentence saying why. */
int rlb__stress_named(int rc, const char *text);

/* The command line of a role: --socket, --seed, and --rank --world --units [--truncate
 * unsealed|sealed] (trainer), --id (client), --replicas (checker). */
typedef struct rlb_stress_role_opts {
    const char *socket; /* the bridge's socket */
    uint64_t seed;      /* the run's seed */
    uint32_t rank, world, units; /* trainer: rank, world, FSDP1 unit mask */
    uint32_t truncate;  /* trainer: rlb_stress_truncate */
    uint32_t id;        /* client: index */
    uint32_t replicas;  /* checker: replicas of the run */
} rlb_stress_role_opts;

/* Parses a role's options and makes SIGTERM set rlb__stress_stopping. Returns 0 or 2. */
int rlb__stress_role_parse(int argc, char **argv, rlb_stress_role_opts *o);
/* Options of a tool (observer) client of the bridge at socket, with short bounds: the
 * bridge may be restarting. */
void rlb__stress_tool_options(rlb_client_options *o, const char *socket);
/* 1 once SIGTERM arrived: finish the work in hand and stop. */
int rlb__stress_stopping(void);
void rlb__stress_sleep_ms(int ms);

/* The roles, run by `rlb stress --role NAME`. Each returns the exit status. */
int rlb__stress_trainer(int argc, char **argv);
int rlb__stress_client(int argc, char **argv);
int rlb__stress_checker(int argc, char **argv);
/* The hostile client, run in a forked child of the supervisor: connects to socket and
 * commits one malformed thing of `kind` (variant from arg), then leaves. Returns 0 when it
 * could connect and do it, 1 otherwise. */
int rlb__stress_hostile(const char *socket, uint32_t kind, uint32_t arg);

#endif /* RLB_LAUNCH_STRESS_H */
