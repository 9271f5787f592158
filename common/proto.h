/* proto.h: every message rlbridge processes exchange, as C structs, and their msgpack
 * encoding (DESIGN §5, §6, §7).
 *
 * A message is one msgpack map with short string keys: "ty" holds its rlb_msg_type, the
 * other keys its fields (the key of each field is written next to it below). Optional
 * fields are left out of the encoding when they are zero (NULL, empty) and read back as
 * zero when absent or nil; unknown keys are ignored, so a field can be added without
 * breaking older peers. Protocol versions are negotiated once: hello carries
 * RLB_ABI_VERSION. Token ids (int32) and logprobs (f32) travel as msgpack `bin` holding
 * little-endian arrays, so packing them is one memcpy and decoding points into the buffer.
 *
 * Packing writes straight into a caller-given buffer (a claimed ring slot) and never past
 * its end; rlb__msg_packed_size says how much to claim. Decoding is a pure function of
 * (buffer, length): it walks the bytes with a bounded validator before reading anything,
 * checks every type, count, range and required field, and names the failing field in its
 * error text. A decoded message BORROWS the buffer (token and logprob arrays point into
 * it) and owns an arena for everything else (arrays, strings), released by
 * rlb__msg_free; keep the buffer alive and unchanged while the message is in use.
 */
#ifndef RLB_COMMON_PROTO_H
#define RLB_COMMON_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "rlb/rlb.h"

#define RLB_PROTO_MAX_DIMS 8          /* dimensions of a shape */
#define RLB_PROTO_MAX_DEPTH 16        /* nesting of maps and arrays in any message */
#define RLB_PROTO_MAX_OBJECTS (1u << 22) /* msgpack objects (keys included) in one message */
#define RLB_PROTO_ARENA_FACTOR 32     /* a decoded message's arena takes at most */
#define RLB_PROTO_ARENA_SLACK 4096    /* FACTOR * length + SLACK bytes */
#define RLB_PROTO_HANDLE_BYTES 64     /* a cudaIpcMemHandle_t */
#define RLB_PROTO_UUID_BYTES 16       /* a CUDA device uuid */

/* Message types. The numbering is part of the wire protocol: append only; 0 is never a
 * valid type (error replies use it for "unknown"). */
typedef enum rlb_msg_type {
    RLB_MSG_HELLO = 1,        /* peer -> bridge: who is connecting */
    RLB_MSG_WELCOME = 2,      /* bridge -> peer: accepted, here is your id */
    RLB_MSG_ERROR = 3,        /* either way: a request failed or could not be decoded */
    RLB_MSG_REGISTER = 4,     /* trainer -> bridge: a batch of shards to sync from */
    RLB_MSG_UNREGISTER = 5,   /* trainer -> bridge: forget shards */
    RLB_MSG_PUBLISH = 6,      /* trainer -> bridge: my shards hold version v */
    RLB_MSG_SYNCED = 7,       /* bridge -> trainer: v is committed */
    RLB_MSG_ABORTED = 8,      /* bridge -> trainer: v was aborted */
    RLB_MSG_GENERATE = 9,     /* trainer/tool -> bridge -> worker: sample completions */
    RLB_MSG_RESULT = 10,      /* worker -> bridge -> trainer: completions */
    RLB_MSG_LOAD = 11,        /* bridge -> worker: v's bytes landed, post-process them */
    RLB_MSG_LOADED = 12,      /* worker -> bridge: post-processing of v finished */
    RLB_MSG_SLEEP = 13,       /* bridge -> worker: free the KV cache (weights stay) */
    RLB_MSG_WAKE = 14,        /* bridge -> worker: restore the KV cache */
    RLB_MSG_STATS = 15,       /* request for counters */
    RLB_MSG_STATS_REPLY = 16, /* counters by name */
    RLB_MSG_SHUTDOWN = 17,    /* stop after the work in flight */
    RLB_MSG_UNREGISTERED = 18, /* bridge -> trainer: the unregister is done, memory unmapped */
    RLB_MSG_COUNT_
} rlb_msg_type;

typedef enum rlb_role {
    RLB_ROLE_TRAINER = 0, /* a trainer rank (librlb / rlbridge in Python) */
    RLB_ROLE_WORKER = 1,  /* an rlb-worker: one TP rank of one replica */
    RLB_ROLE_TOOL = 2,    /* a command-line tool (stats, shutdown, generate by hand) */
    RLB_ROLE_COUNT_
} rlb_role;

typedef enum rlb_layout_kind {
    RLB_LAYOUT_FULL = 0,  /* the whole tensor in one block */
    RLB_LAYOUT_FSDP1 = 1, /* rank's chunk of an FSDP1 FlatParameter (a whole unit) */
    RLB_LAYOUT_FSDP2 = 2, /* rank's rows of a DTensor Shard(0) */
    RLB_LAYOUT_COUNT_
} rlb_layout_kind;

typedef enum rlb_mem_kind {
    RLB_MEM_HOST_SHM = 0,    /* shared memory fd (memfd / shm), passed with SCM_RIGHTS */
    RLB_MEM_CUDA_IPC = 1,    /* cudaIpcMemHandle_t of the allocation */
    RLB_MEM_CUDA_VMM_FD = 2, /* POSIX fd of a cuMemCreate allocation, passed with SCM_RIGHTS */
    RLB_MEM_COUNT_
} rlb_mem_kind;

typedef enum rlb_msg_finish {
    RLB_MSG_FINISH_STOP = 0,   /* sampled a stop token */
    RLB_MSG_FINISH_LENGTH = 1, /* reached max_tokens */
    RLB_MSG_FINISH_ABORT = 2,  /* cancelled (shutdown, failed sync, error) */
    RLB_MSG_FINISH_COUNT_
} rlb_msg_finish;

/* Memory reference (DESIGN §3): where a buffer lives, never a raw pointer. */
typedef struct rlb_mem_ref {
    rlb_mem_kind kind;                          /* "k" */
    uint32_t fd_index;                          /* "fd": HOST_SHM, CUDA_VMM_FD: index of the
                                                   fd among those passed with SCM_RIGHTS */
    uint8_t ipc_handle[RLB_PROTO_HANDLE_BYTES]; /* "h": CUDA_IPC handle; zero otherwise */
    uint8_t device_uuid[RLB_PROTO_UUID_BYTES];  /* "uuid": GPU uuid; zero for host memory */
    uint64_t offset;                            /* "off": bytes from the allocation start */
    uint64_t length;                            /* "len": bytes of the tensor's data */
} rlb_mem_ref;

/* ---- hello / welcome / error ------------------------------------------------------- */

typedef struct rlb_msg_hello {
    uint32_t abi_version; /* "abi": RLB_ABI_VERSION of the sender (required) */
    rlb_role role;        /* "role" (required) */
    uint32_t rank;        /* "rank": trainer rank, or global worker index */
    uint32_t world;       /* "world": trainer ranks, or workers; rank < world */
    uint32_t replica;     /* "rep": worker: data-parallel replica index */
    uint32_t tp_rank;     /* "tp": worker: tensor-parallel rank in the replica */
    uint32_t tp_size;     /* "tps": worker: tensor-parallel size; tp_rank < tp_size */
    rlb_device device;    /* "dev": worker: its backend */
    uint8_t device_uuid[RLB_PROTO_UUID_BYTES]; /* "uuid": worker on CUDA: its GPU's uuid */
    rlb_dtype weight_dtype; /* "wdt": worker: element type of its weight buffers (F32 when
                               absent; the CPU backend's) */
    bool has_weights;     /* "wts": worker: its buffers hold a checkpoint's weights, loaded at
                             start (absent: zeros until the first sync) */
} rlb_msg_hello;

typedef struct rlb_msg_welcome {
    uint32_t abi_version;    /* "abi": RLB_ABI_VERSION of the bridge (required) */
    uint32_t peer_id;        /* "peer": id the bridge gave this connection */
    uint64_t weight_version; /* "ver": committed weight version, 0 = none yet */
} rlb_msg_welcome;

typedef struct rlb_msg_error {
    int32_t code;         /* "code": negative RLB_E* (required) */
    uint64_t request_id;  /* "id": the failed request, 0 = not tied to one */
    uint32_t in_reply_to; /* "re": rlb_msg_type that failed, 0 = unknown */
    const char *text;     /* "text": what went wrong, for a human (required) */
} rlb_msg_error;

/* ---- weight registration and sync -------------------------------------------------- */

/* One entry of an FSDP1 FlatParameter, in flat order: a parameter or alignment padding
 * (PyTorch's _fqns/_shapes/_numels_with_padding/_is_padding_mask, merged). */
typedef struct rlb_msg_flat_entry {
    const char *name;                   /* "name": parameter name; NULL for padding */
    uint32_t ndim;                      /* dimensions in shape; 0 for padding */
    uint64_t shape[RLB_PROTO_MAX_DIMS]; /* "shape": the parameter's shape */
    uint64_t numel;                     /* "numel": elements it occupies (required) */
    bool padding;                       /* "pad": alignment padding, not a parameter */
} rlb_msg_flat_entry;

typedef struct rlb_msg_layout {
    rlb_layout_kind kind;             /* "k" (required) */
    uint32_t rank;                    /* "rank": FSDP1/FSDP2: this shard's FSDP rank */
    uint32_t world;                   /* "world": FSDP1/FSDP2: FSDP world size */
    uint32_t unit;                    /* "unit": FSDP1: unit id (FlatParameter index) */
    uint32_t align;                   /* "align": FSDP1: each parameter starts at a
                                         multiple of this many elements; 0 or 1 = none */
    uint32_t n_entries;               /* FSDP1: entries in the FlatParameter */
    const rlb_msg_flat_entry *entries; /* "ent": FSDP1: [n_entries] */
} rlb_msg_layout;

/* A registered tensor: for FULL and FSDP2 one parameter, for FSDP1 one FlatParameter whose
 * global shape is [padded total elements]. mem describes exactly this rank's bytes. */
typedef struct rlb_msg_tensor {
    const char *name;                   /* "name": parameter (or FlatParameter) name */
    rlb_dtype dtype;                    /* "dt" */
    uint32_t ndim;                      /* dimensions in shape */
    uint64_t shape[RLB_PROTO_MAX_DIMS]; /* "shape": global shape */
    rlb_msg_layout layout;              /* "lay" */
    rlb_mem_ref mem;                    /* "mem" */
} rlb_msg_tensor;

/* A LoRA adapter declared for one weight (DESIGN §10): its factors are registered as
 * tensors "<module>.lora_A.weight" [r, in] and "<module>.lora_B.weight" [out, r]. */
typedef struct rlb_msg_lora {
    const char *target; /* "w": HF name of the adapted weight (required); with rank 0,
                           "*" stands for every weight this peer declared */
    uint32_t rank;      /* "r": r >= 1 declares; 0 takes this peer's declaration back */
    double scale;       /* "s": the adapter's scale, alpha / r or alpha / sqrt(r) */
} rlb_msg_lora;

/* Tensors and adapter declarations, at least one of either. Declarations are applied
 * first (all or none), so a batch may register the factors it declares; they stay applied
 * when the batch's tensors are then refused. */
typedef struct rlb_msg_register {
    uint32_t n_tensors;            /* tensors in the batch */
    const rlb_msg_tensor *tensors; /* "tens": [n_tensors] */
    uint32_t n_loras;              /* adapter declarations in the batch */
    const rlb_msg_lora *loras;     /* "lora": [n_loras] */
} rlb_msg_register;

/* A name in a list (unregister). */
typedef struct rlb_msg_name {
    const char *name; /* "name" (required) */
} rlb_msg_name;

typedef struct rlb_msg_unregister {
    uint32_t n_names;           /* 0 = every tensor this peer registered */
    const rlb_msg_name *names;  /* "names": [n_names] */
} rlb_msg_unregister;

/* The answer to an unregister, sent once the bridge dropped the tensors and closed every
 * mapping of theirs (for device memory: after the last use of it is fenced), so the trainer
 * may free the memory as soon as it arrives. A segment (segmsg.h) in which no registered
 * tensor remains is released with them: its id is free, and a later register that needs
 * it sends its fd again. */
typedef struct rlb_msg_unregistered {
    uint32_t n_tensors; /* "n": tensors removed */
} rlb_msg_unregistered;

#define RLB_PROTO_WEIGHT_BUFFERS 2 /* weight buffers a worker has at most (staged mode) */

/* load: version v's bytes are in weight buffer `buffer` of the worker, which serves from
 * that buffer once it processed the load (post-load processing, then the switch). A
 * worker of a pause-mode bridge has buffer 0 only; a staged one has 0 and 1, and the
 * bridge names the one it wrote (or, after an aborted sync, the one still holding the
 * committed version). */
typedef struct rlb_msg_load {
    uint64_t version; /* "ver" (required) */
    uint32_t buffer;  /* "buf": < RLB_PROTO_WEIGHT_BUFFERS; 0 when absent */
} rlb_msg_load;

/* publish: a version number (>= 1) and, for a trainer whose tensors are device memory, the
 * interprocess event it recorded on its stream after writing them (cuIpcGetEventHandle):
 * the bridge makes its own stream wait on it (cudaIpcOpenEventHandle once, then
 * cudaStreamWaitEvent per publish) before reading. Both of ev and ev_uuid, or neither. */
typedef struct rlb_msg_publish {
    uint64_t version;                      /* "ver" (required) */
    uint8_t event[RLB_PROTO_HANDLE_BYTES]; /* "ev": CUipcEventHandle; zero = no event */
    uint8_t event_uuid[RLB_PROTO_UUID_BYTES]; /* "evu": uuid of the GPU the event is on */
} rlb_msg_publish;

typedef struct rlb_msg_synced {
    uint64_t version; /* "ver" (required) */
    uint64_t bytes;   /* "bytes": bytes written into worker buffers */
    double ms;        /* "ms": wall time from the last publish to the commit */
    double gbps;      /* "gbps": bytes / time, GB/s */
} rlb_msg_synced;

/* aborted (why a version was given up), loaded (how post-processing and the switch went:
 * the answer to one load, in the order the loads were sent). */
typedef struct rlb_msg_outcome {
    uint64_t version; /* "ver" (required) */
    int32_t code;     /* "code": aborted: negative RLB_E*; loaded: 0 or negative RLB_E* */
    const char *text; /* "text": details for a human */
    uint32_t buffer;  /* "buf": loaded only: the weight buffer the worker serves from now
                         (the load's on success, the one it served before on failure) */
} rlb_msg_outcome;

/* ---- generation -------------------------------------------------------------------- */

typedef struct rlb_msg_sampling {
    uint32_t n;          /* "n": samples per prompt, >= 1 (required) */
    uint32_t max_tokens; /* "max": tokens to generate per sample, >= 1 (required) */
    float temperature;   /* "temp": >= 0, 0 = greedy (required) */
    float top_p;         /* "topp": nucleus mass, 0 < top_p <= 1 (required) */
    uint32_t top_k;      /* "topk": 0 = no top-k cut */
    uint64_t seed;       /* "seed": key of the counter-based sampling noise */
    const void *stop;    /* "stop": int32 token ids that end a sample (little-endian) */
    uint32_t n_stop;     /* entries in stop */
    bool logprobs;       /* "lp": return the logprob of every sampled token */
} rlb_msg_sampling;

typedef struct rlb_msg_prompt {
    const void *tokens;           /* "t": int32 token ids (little-endian), n_tokens >= 1 */
    uint32_t n_tokens;            /* entries in tokens */
    const rlb_msg_sampling *sampling; /* "sp": this prompt's parameters; NULL = the request's */
} rlb_msg_prompt;

typedef struct rlb_msg_generate {
    uint64_t request_id;         /* "id": >= 1, unique per sender (required) */
    uint64_t min_weight_version; /* "minv": serve only with weights at least this new */
    rlb_msg_sampling sampling;       /* "sp": parameters shared by the prompts (required) */
    uint32_t n_prompts;          /* at least 1 */
    const rlb_msg_prompt *prompts; /* "p": [n_prompts] */
} rlb_msg_generate;

typedef struct rlb_msg_sample {
    uint32_t prompt;         /* "p": index of its prompt in the request */
    uint32_t index;          /* "i": which of the prompt's n samples */
    const void *tokens;      /* "t": generated int32 token ids (little-endian) */
    uint32_t n_tokens;       /* entries in tokens */
    const void *logprobs;    /* "lp": f32 logprob per token (little-endian), or NULL */
    uint32_t n_logprobs;     /* 0 or n_tokens */
    rlb_msg_finish finish;       /* "fin" */
    uint64_t weight_version; /* "ver": the weights every token was sampled with */
} rlb_msg_sample;

typedef struct rlb_msg_result {
    uint64_t request_id;           /* "id": the generate request's id (required) */
    bool done;                     /* "done": the last result of this request */
    uint32_t n_samples;            /* entries in samples */
    const rlb_msg_sample *samples; /* "s": [n_samples] */
} rlb_msg_result;

/* ---- control ----------------------------------------------------------------------- */

/* stats request: which request a reply answers. */
typedef struct rlb_msg_stats {
    uint64_t request_id; /* "id" */
} rlb_msg_stats;

typedef struct rlb_msg_stat {
    const char *name; /* "name": counter name, e.g. "bytes_synced" (required) */
    double value;     /* "v" */
} rlb_msg_stat;

typedef struct rlb_msg_stats_reply {
    uint64_t request_id;        /* "id": the stats request's id */
    uint32_t n_stats;           /* entries in stats */
    const rlb_msg_stat *stats;  /* "s": [n_stats] */
} rlb_msg_stats_reply;

/* A message: the type selects the member of the union. sleep, wake and shutdown have no
 * fields. */
typedef struct rlb_msg {
    rlb_msg_type type;
    union {
        rlb_msg_hello hello;             /* HELLO */
        rlb_msg_welcome welcome;         /* WELCOME */
        rlb_msg_error error;             /* ERROR */
        rlb_msg_register reg;            /* REGISTER */
        rlb_msg_unregister unreg;        /* UNREGISTER */
        rlb_msg_publish publish;         /* PUBLISH */
        rlb_msg_synced synced;           /* SYNCED */
        rlb_msg_outcome aborted;         /* ABORTED */
        rlb_msg_generate generate;       /* GENERATE */
        rlb_msg_result result;           /* RESULT */
        rlb_msg_load load;               /* LOAD */
        rlb_msg_outcome loaded;          /* LOADED */
        rlb_msg_stats stats;             /* STATS */
        rlb_msg_stats_reply stats_reply; /* STATS_REPLY */
        rlb_msg_unregistered unregistered; /* UNREGISTERED */
    };
    void *arena; /* decoded messages: owner of arrays and strings; NULL when packed by hand */
} rlb_msg;

/* Name of a message type ("generate"), or "?" outside the enum. */
const char *rlb__msg_type_name(uint32_t type);

/* Bytes msg encodes to, exactly. Returns 0, or RLB_EINVAL when msg is not a valid message
 * (the reason is logged at debug level, subsystem proto). */
int rlb__msg_packed_size(const rlb_msg *msg, size_t *size);

/* Encodes msg into buf[0..cap) and stores its length in *len. Returns 0, RLB_EINVAL (msg
 * is not valid; nothing is written) or RLB_ETOOBIG (it does not fit: buf may hold a
 * partial encoding, nothing is written at or past buf[cap]; fall back to a heap buffer of
 * rlb__msg_packed_size bytes and a fragmented send). */
int rlb__msg_pack(const rlb_msg *msg, void *buf, size_t cap, size_t *len);

/* Decodes buf[0..len) into *msg. Returns 0, RLB_EPROTO (malformed or invalid: err holds a
 * text naming the field) or RLB_ENOMEM. On success *msg borrows buf (see above) and must
 * be released with rlb__msg_free; on failure *msg is zeroed and owns nothing. err may be
 * NULL; a text longer than err_cap is cut. */
int rlb__msg_decode(const void *buf, size_t len, rlb_msg *msg, char *err, size_t err_cap);

/* Releases what a decoded message owns and zeroes it. Safe on a zeroed or hand-built
 * message. */
void rlb__msg_free(rlb_msg *msg);

/* Builds the ERROR message that answers an input rlb__msg_decode refused, so the
 * connection goes on: code and text as given (text is borrowed), plus the request id and
 * message type when the top-level map still yields them. Never fails; *reply owns nothing. */
void rlb__msg_error_reply(const void *buf, size_t len, int code, const char *text,
                          rlb_msg *reply);

/* Element i of a decoded (or to-be-packed) little-endian int32 / f32 array, read without
 * assuming alignment: bins inside a message start at any byte. */
static inline int32_t rlb__msg_i32(const void *array, size_t i)
{
    int32_t v;
    memcpy(&v, (const unsigned char *)array + 4 * i, 4);
    return v;
}

static inline float rlb__msg_f32(const void *array, size_t i)
{
    float v;
    memcpy(&v, (const unsigned char *)array + 4 * i, 4);
    return v;
}

/* ---- internal: the schema shared by proto.c, proto_pack.c and proto_decode.c -------- */

/* What a field holds, i.e. how it is stored in its struct and encoded. */
typedef enum rlb__fkind {
    RLB__FK_U64,     /* uint64_t; msgpack non-negative int */
    RLB__FK_U32,     /* uint32_t; non-negative int <= UINT32_MAX */
    RLB__FK_I32,     /* int32_t; int in range */
    RLB__FK_ENUM,    /* an int-sized enum; int in [0, desc.size) */
    RLB__FK_BOOL,    /* bool; msgpack true/false */
    RLB__FK_F32,     /* float; msgpack float or int, finite */
    RLB__FK_F64,     /* double; msgpack float or int, finite */
    RLB__FK_STR,     /* const char *, NUL-terminated; msgpack str without NUL bytes */
    RLB__FK_BIN,     /* const void * + uint32_t count of size-byte elements; msgpack bin */
    RLB__FK_BYTES,   /* uint8_t[size]; msgpack bin of exactly size bytes */
    RLB__FK_DIMS,    /* uint64_t[RLB_PROTO_MAX_DIMS] + uint32_t ndim; array of ints */
    RLB__FK_STRUCT,  /* an inline struct of desc.sub; msgpack map; always required */
    RLB__FK_PSTRUCT, /* const T * to a struct of desc.sub, NULL = absent; msgpack map */
    RLB__FK_ARRAY    /* const T * + uint32_t count of desc.sub structs; array of maps */
} rlb__fkind;

typedef struct rlb__struct_desc rlb__struct_desc;

typedef struct rlb__field {
    const char *key;             /* the short key on the wire */
    rlb__fkind kind;             /* storage and encoding */
    bool required;               /* absent -> error; packed even when zero */
    uint16_t off;                /* offsetof the value in its struct */
    uint16_t count_off;          /* BIN, ARRAY: offsetof the uint32_t count; DIMS: ndim */
    uint32_t size;               /* BIN: element bytes; BYTES: length; ENUM: values */
    const rlb__struct_desc *sub; /* STRUCT, PSTRUCT, ARRAY: the element's schema */
} rlb__field;

/* Where a validation error is reported: a text "path.to.field: what is wrong". */
typedef struct rlb__proto_err {
    char *buf;      /* destination of the text, or NULL */
    size_t cap;     /* bytes at buf */
    char path[160]; /* dotted path of the struct being looked at */
    size_t path_len; /* bytes used in path */
    int code;       /* what a failure returns: RLB_EPROTO (decode) or RLB_EINVAL (pack) */
} rlb__proto_err;

struct rlb__struct_desc {
    const char *name;          /* for error texts */
    size_t size;               /* sizeof the C struct */
    const rlb__field *fields;  /* the fields, in packing order */
    unsigned n_fields;         /* entries in fields (at most 64) */
    /* Checks what the field kinds cannot (ranges, consistency between fields). Returns 0,
     * or err->code after rlb__proto_fail. NULL = nothing to check. */
    int (*check)(const void *s, rlb__proto_err *err);
};

/* Address of field f in the struct at s, and the values of its pointer and count parts. */
static inline void *rlb__field_addr(const void *s, const rlb__field *f)
{
    return (char *)s + f->off;
}

static inline const void *rlb__field_pointer(const void *s, const rlb__field *f)
{
    const void *p;
    memcpy(&p, (const char *)s + f->off, sizeof p);
    return p;
}

static inline uint32_t rlb__field_count(const void *s, const rlb__field *f)
{
    uint32_t n;
    memcpy(&n, (const char *)s + f->count_off, sizeof n);
    return n;
}

/* The schema of a message type's fields, or NULL outside the enum. */
const rlb__struct_desc *rlb__msg_schema(uint32_t type);
/* Address of the struct holding msg's fields (all union members start there); like
 * strchr, it is writable when msg is. */
void *rlb__msg_body(const rlb_msg *msg);

/* Checks every field of the struct at s against desc, recursively, naming the first bad
 * field in err. Returns 0 or err->code. */
int rlb__proto_validate(const rlb__struct_desc *desc, const void *s, rlb__proto_err *err);
/* Appends ".key" or "[index]" to err's path; returns the previous length for pop. */
size_t rlb__proto_push(rlb__proto_err *err, const char *key);
size_t rlb__proto_push_index(rlb__proto_err *err, size_t index);
void rlb__proto_pop(rlb__proto_err *err, size_t len);
/* Writes "<path>.<field>: <message>" (field may be NULL) and returns err->code. */
int rlb__proto_fail(rlb__proto_err *err, const char *field, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* numel of a shape into *numel; returns -1 when the product overflows 64 bits. */
int rlb__proto_numel(const uint64_t *shape, uint32_t ndim, uint64_t *numel);

#endif /* RLB_COMMON_PROTO_H */
