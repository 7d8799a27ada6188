/* kd_recipe: the recipe loader. One schema table (key, type, offset, bounds, default, doc) drives
 * defaults, YAML parsing, overrides, validation, YAML writing and the reference doc; errors
 * carry libyaml marks (netplan style). Stateless apart from const tables; thread-safe. */
#include "kd_recipe.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

/* ---------------------------------------------------------------------------------------- */
/* The schema                                                                               */

typedef enum { T_STR, T_LONG, T_INT, T_FLOAT, T_BOOL, T_ENUM, T_LAYERS, T_STRLIST } vtype_t;

enum {
    F_REQ = 1, /* must be given (layer lists: and non-empty) */
    F_MIN = 2, /* value >= min (or > min with F_MIN_OPEN) */
    F_MAX = 4, /* value <= max (or < max with F_MAX_OPEN) */
    F_MIN_OPEN = 8,
    F_MAX_OPEN = 16,
    F_DEF_KERNEL = 32 /* layer field whose default is the layer's kernel */
};

/* An enum as the recipe spells it; adapters over the kd_names.c tables. */
typedef struct {
    int count;
    const char *(*name)(int v);
    int (*parse)(const char *s, int *v);
    void (*store)(void *field, int v);
    int (*load)(const void *field);
} enum_ops_t;

#define ENUM_OPS(id, type, name_fn, parse_fn, count_)                                              \
    static const char *id##_name(int v) {                                                          \
        return name_fn((type)v);                                                                   \
    }                                                                                              \
    static int id##_parse(const char *s, int *v) {                                                 \
        type t;                                                                                    \
        if (parse_fn(s, &t) != 0) return -1;                                                       \
        *v = (int)t;                                                                               \
        return 0;                                                                                  \
    }                                                                                              \
    static void id##_store(void *f, int v) {                                                       \
        *(type *)f = (type)v;                                                                      \
    }                                                                                              \
    static int id##_load(const void *f) {                                                          \
        return (int)*(const type *)f;                                                              \
    }                                                                                              \
    static const enum_ops_t id##_ops = {count_, id##_name, id##_parse, id##_store, id##_load};

ENUM_OPS(div, kd_divergence_t, kd_divergence_name, kd_divergence_parse, KD_DIV_COUNT)
ENUM_OPS(opt, kd_opt_kind_t, kd_opt_kind_name, kd_opt_kind_parse, KD_OPT_COUNT)
ENUM_OPS(sched, kd_sched_kind_t, kd_sched_kind_name, kd_sched_kind_parse, KD_SCHED_COUNT)
ENUM_OPS(cons, kd_consistency_t, kd_consistency_name, kd_consistency_parse, 3)
ENUM_OPS(wire, kd_wire_format_t, kd_wire_format_name, kd_wire_format_parse, 3)
ENUM_OPS(cenc, kd_cache_encoding_t, kd_cache_encoding_name, kd_cache_encoding_from_name,
         KD_ENC_COUNT)
ENUM_OPS(layer, kd_layer_kind_t, kd_layer_kind_name, kd_layer_kind_parse, KD_LAYER_KIND_COUNT)

/* Enums kept as text in the struct (char[16]: logging.level, data.tokenizer) but chosen from a
 * fixed list. */
#define TEXT_ENUM_OPS(id, ...)                                                                     \
    static const char *const id##_names[] = {__VA_ARGS__};                                         \
    enum { id##_count = sizeof id##_names / sizeof id##_names[0] };                                \
    static const char *id##_name(int v) {                                                          \
        return (v >= 0 && v < id##_count) ? id##_names[v] : "?";                                   \
    }                                                                                              \
    static int id##_parse(const char *s, int *v) {                                                 \
        for (int i = 0; i < id##_count; i++)                                                       \
            if (strcmp(s, id##_names[i]) == 0) {                                                   \
                *v = i;                                                                            \
                return 0;                                                                          \
            }                                                                                      \
        return -1;                                                                                 \
    }                                                                                              \
    static void id##_store(void *f, int v) {                                                       \
        memset(f, 0, 16);                                                                          \
        strcpy((char *)f, id##_names[v]);                                                          \
    }                                                                                              \
    static int id##_load(const void *f) {                                                          \
        int v;                                                                                     \
        return id##_parse((const char *)f, &v) == 0 ? v : -1;                                      \
    }                                                                                              \
    static const enum_ops_t id##_ops = {id##_count, id##_name, id##_parse, id##_store, id##_load};

TEXT_ENUM_OPS(level, "debug", "info", "warn", "error")
TEXT_ENUM_OPS(tok, "bytes", "gpt2")
ENUM_OPS(dfmt, kd_data_format_t, kd_data_format_name, kd_data_format_parse, 3)

/* The run name becomes a directory name. */
static int check_name(const char *s, char *msg, size_t n) {
    if (!*s) return kd_err(msg, n, "must not be empty");
    for (const char *p = s; *p; p++) {
        char ch = *p;
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '_' || ch == '.' || ch == '-';
        if (!ok) return kd_err(msg, n, "may contain only A-Z a-z 0-9 _ . - (got '%s')", s);
    }
    if (strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
        return kd_err(msg, n, "'%s' cannot be a run directory name", s);
    return 0;
}

typedef struct {
    const char *key; /* dotted: "optim.lr", "cluster.security.curve"; layer fields: the name */
    vtype_t type;
    size_t off;  /* field (layers, string lists: the count, an int) */
    size_t off2; /* layers, string lists: the array */
    size_t size; /* strings: buffer size (string lists: of one entry) */
    const enum_ops_t *ops;
    int (*check)(const char *s, char *msg, size_t n);
    double min, max;
    int flags;
    const char *def; /* default, as recipe text; NULL when required */
    const char *desc;
    kd_layer_kind_t kind; /* layer fields only */
} row_t;

#define RFIELD(f) offsetof(kd_recipe_t, f)
#define RSIZE(f)  sizeof(((kd_recipe_t *)0)->f)
#define STR(k, f, fl, chk, d, doc)                                                                 \
    {                                                                                              \
        .key = k, .type = T_STR, .off = RFIELD(f), .size = RSIZE(f), .check = chk, .flags = fl,    \
        .def = d, .desc = doc                                                                      \
    }
#define LONG(k, f, fl, lo, hi, d, doc)                                                             \
    {                                                                                              \
        .key = k, .type = T_LONG, .off = RFIELD(f), .min = lo, .max = hi, .flags = fl, .def = d,   \
        .desc = doc                                                                                \
    }
#define FLOAT(k, f, fl, lo, hi, d, doc)                                                            \
    {                                                                                              \
        .key = k, .type = T_FLOAT, .off = RFIELD(f), .min = lo, .max = hi, .flags = fl, .def = d,  \
        .desc = doc                                                                                \
    }
#define INT(k, f, fl, lo, hi, d, doc)                                                              \
    {                                                                                              \
        .key = k, .type = T_INT, .off = RFIELD(f), .min = lo, .max = hi, .flags = fl, .def = d,    \
        .desc = doc                                                                                \
    }
#define BOOL(k, f, d, doc)                                                                         \
    { .key = k, .type = T_BOOL, .off = RFIELD(f), .def = d, .desc = doc }
#define ENUM(k, f, o, d, doc)                                                                      \
    { .key = k, .type = T_ENUM, .off = RFIELD(f), .ops = &o, .def = d, .desc = doc }
/* A list of strings: count field n, array field a of fixed-size entries, at most max of them. */
#define STRLIST(k, n, a, max_, doc)                                                                \
    {                                                                                              \
        .key = k, .type = T_STRLIST, .off = RFIELD(n), .off2 = RFIELD(a), .size = RSIZE(a[0]),     \
        .max = max_, .def = "[]", .desc = doc                                                      \
    }
#define LAYERS(k, sec, fl, doc)                                                                    \
    {                                                                                              \
        .key = k, .type = T_LAYERS, .off = RFIELD(sec.n_layers), .off2 = RFIELD(sec.layers),       \
        .flags = fl, .def = "[]", .desc = doc                                                      \
    }

/* A GPT model (kd_gpt.h) as sub-section <sec>.gpt; gpt.layers > 0 selects it. */
#define GPT_KEYS(sec, f)                                                                           \
    INT(sec ".gpt.layers", f.gpt.layers, BTW, 0, KD_GPT_MAX_LAYERS, "0",                           \
        "GPT-2-style decoder: transformer blocks (0 = not a GPT)"),                                \
        INT(sec ".gpt.width", f.gpt.width, BTW, 1, 65536, "128", "GPT: embedding width"),          \
        INT(sec ".gpt.heads", f.gpt.heads, BTW, 1, 1024, "4",                                      \
            "GPT: attention heads (width must be a multiple)"),                                    \
        INT(sec ".gpt.context", f.gpt.context, BTW, 1, 65536, "256",                               \
            "GPT: the longest window, in tokens (n_positions)"),                                   \
        INT(sec ".gpt.vocab", f.gpt.vocab, BTW, 0, 1 << 24, "0",                                   \
            "GPT: vocabulary size (0 = the tokenizer's)"),                                         \
        FLOAT(sec ".gpt.dropout", f.gpt.dropout, BTW | F_MAX_OPEN, 0, 1, "0",                      \
              "GPT: dropout on the embeddings and the residual branches")

#define GE  F_MIN
#define GT  (F_MIN | F_MIN_OPEN)
#define BTW (F_MIN | F_MAX)

/* Sections appear in this order in written recipes; keys of a section must be contiguous. */
static const row_t schema[] = {
    STR("name", name, F_REQ, check_name, NULL, "run name; outputs go to <runs_dir>/<name>/"),
    LONG("seed", seed, GE, 0, 0, "1", "seed for initialisation, shuffling and dropout"),

    STR("data.dir", data.dir, 0, NULL, "/usr/share/datasets/fashion-mnist",
        "directory of the dataset files"),
    STR("data.train_images", data.train_images, 0, NULL, "train-images-idx3-ubyte.gz",
        "training images (IDX, .gz or raw), relative to dir unless absolute"),
    STR("data.train_labels", data.train_labels, 0, NULL, "train-labels-idx1-ubyte.gz",
        "training labels (IDX)"),
    STR("data.test_images", data.test_images, 0, NULL, "t10k-images-idx3-ubyte.gz",
        "test images (IDX)"),
    STR("data.test_labels", data.test_labels, 0, NULL, "t10k-labels-idx1-ubyte.gz",
        "test labels (IDX)"),
    LONG("data.val_size", data.val_size, GE, 0, 0, "5000",
         "samples held out of the training file for validation"),
    LONG("data.train_subset", data.train_subset, GE, 0, 0, "0",
         "use only the first N training samples (0 = all)"),
    LONG("data.test_subset", data.test_subset, GE, 0, 0, "0",
         "use only the first N test samples (0 = all)"),
    ENUM("data.format", data.format, dfmt_ops, "images",
         "images (IDX files above), text (UTF-8 files, tokenized) or tokens (llm.c or nanoGPT "
         "token shards)"),
    STRLIST("data.files", data.n_files, data.files, KD_MAX_DATA_FILES,
            "text or tokens: the files, in order, relative to dir unless absolute (their token "
            "streams are joined with end-of-text between them)"),
    ENUM("data.tokenizer", data.tokenizer, tok_ops, "bytes",
         "text: bytes (256 byte values + end-of-text) or gpt2 (GPT-2's byte-level BPE)"),
    STR("data.tokenizer_dir", data.tokenizer_dir, 0, NULL, "",
        "gpt2: directory of encoder.json and vocab.bpe (empty = the ones scripts/install-deps.sh "
        "fetched)"),
    LONG("data.stride", data.stride, GE, 0, 0, "0",
         "text or tokens: tokens between the starts of consecutive windows (0 = context: "
         "windows share only their boundary token)"),
    FLOAT("data.val_fraction", data.val_fraction, BTW | F_MAX_OPEN, 0, 0.5, "0.05",
          "text or tokens: the fraction of the stream, before the test part at its end, held "
          "out for validation"),
    FLOAT("data.test_fraction", data.test_fraction, BTW | F_MAX_OPEN, 0, 0.5, "0.05",
          "text or tokens: the fraction at the end of the stream held out for testing"),
    LONG("data.val_windows", data.val_windows, GE, 0, 0, "0",
         "text or tokens: evaluate only the first N validation windows (0 = all)"),
    LONG("data.test_windows", data.test_windows, GE, 0, 0, "0",
         "text or tokens: test only on the first N windows (0 = all)"),

    LAYERS("student.layers", student, 0,
           "the student network, a non-empty list of layers (or student.gpt)"),
    /* a sub-section: these keys stay last in `student` */
    GPT_KEYS("student", student),

    STR("teacher.checkpoint", teacher.checkpoint, 0, NULL, "",
        "teacher weights (safetensors); empty = no teacher"),
    STR("teacher.recipe", teacher.recipe, 0, NULL, "",
        "recipe that trains the teacher: `kdist run` runs it first when teacher.checkpoint "
        "does not exist"),
    LAYERS("teacher.layers", teacher, 0, "the teacher network (list of layers)"),
    LONG("teacher.batch_size", teacher.batch_size, BTW, 1, 65536, "256",
         "samples (language models: windows) per teacher forward pass"),
    BOOL("teacher.drop_vocab_padding", teacher.drop_vocab_padding, "false",
         "a GPT teacher whose vocabulary is padded beyond the tokenizer's (50304 for 50257): "
         "drop the padding logits (without this, a larger teacher.gpt.vocab is refused)"),
    GPT_KEYS("teacher", teacher),

    STR("cache.dir", cache.dir, 0, NULL, "cache",
        "directory of the teacher-logit cache, shared by teacher nodes and runs"),
    ENUM("cache.encoding", cache.encoding, cenc_ops, "fp32",
         "fp32, fp16, int8 (per-row scale), topk (cache.topk values + the rest's mass) or "
         "sampled (language models: cache.samples draws per position at distill.temperature)"),
    LONG("cache.topk", cache.topk, BTW, 1, 1 << 20, "5",
         "logits kept per sample (per position) with the topk encoding"),
    LONG("cache.samples", cache.samples, BTW, 1, KD_CACHE_MAX_SAMPLES, "12",
         "classes drawn from the teacher per position with the sampled encoding"),
    STR("cache.import", cache.import, 0, NULL, "",
        "distil from logits imported with `kdist cache import --label LABEL` (no teacher model)"),

    ENUM("distill.loss", distill.loss.divergence, div_ops, "forward_kl",
         "divergence between softened teacher and student distributions"),
    FLOAT("distill.temperature", distill.loss.temperature, GT | F_MAX, 0, 100, "4",
          "softmax temperature T"),
    FLOAT("distill.alpha", distill.loss.alpha, BTW, 0, 1, "0",
          "weight of the distillation term (0 = plain supervised training)"),

    ENUM("optim.name", optim.cfg.kind, opt_ops, "sgd", "optimizer"),
    FLOAT("optim.lr", schedule.cfg.lr, GT, 0, 0, "0.05", "base learning rate (peak for onecycle)"),
    FLOAT("optim.momentum", optim.cfg.momentum, BTW | F_MAX_OPEN, 0, 1, "0.9", "SGD momentum"),
    BOOL("optim.nesterov", optim.cfg.nesterov, "true", "SGD Nesterov momentum"),
    FLOAT("optim.weight_decay", optim.cfg.weight_decay, GE, 0, 0, "5e-4",
          "L2 (SGD) or decoupled (AdamW) weight decay"),
    FLOAT("optim.beta1", optim.cfg.beta1, BTW | F_MAX_OPEN, 0, 1, "0.9", "AdamW beta1"),
    FLOAT("optim.beta2", optim.cfg.beta2, BTW | F_MAX_OPEN, 0, 1, "0.999", "AdamW beta2"),
    FLOAT("optim.eps", optim.cfg.eps, GT, 0, 0, "1e-8", "AdamW epsilon"),
    FLOAT("optim.clip_norm", optim.cfg.clip_norm, GE, 0, 0, "0",
          "global gradient L2 norm bound (0 = no clipping)"),

    ENUM("schedule.name", schedule.cfg.kind, sched_ops, "onecycle",
         "learning-rate schedule (total steps are derived by the trainer)"),
    LONG("schedule.warmup_steps", schedule.cfg.warmup_steps, GE, 0, 0, "0",
         "linear warm-up steps (constant, step, cosine)"),
    LONG("schedule.step_size", schedule.cfg.step_size, GE, 1, 0, "1000",
         "step: multiply the lr by gamma every step_size steps"),
    FLOAT("schedule.gamma", schedule.cfg.gamma, GT | F_MAX, 0, 1, "0.1", "step: decay factor"),
    FLOAT("schedule.min_lr", schedule.cfg.min_lr, GE, 0, 0, "0", "cosine: final learning rate"),
    FLOAT("schedule.pct_start", schedule.cfg.pct_start, GT | F_MAX | F_MAX_OPEN, 0, 1, "0.3",
          "onecycle: fraction of steps spent rising"),
    FLOAT("schedule.div_factor", schedule.cfg.div_factor, GT, 0, 0, "25",
          "onecycle: initial lr = lr / div_factor"),
    FLOAT("schedule.final_div_factor", schedule.cfg.final_div_factor, GT, 0, 0, "1e4",
          "onecycle: final lr = initial lr / final_div_factor"),

    LONG("train.epochs", train.epochs, BTW, 1, 100000, "15", "passes over the training set"),
    LONG("train.batch_size", train.batch_size, BTW, 1, 65536, "128",
         "samples per batch (one worker's gradient; a sync step averages one batch per worker)"),
    LONG("train.max_steps", train.max_steps, GE, 0, 0, "0",
         "stop after this many optimizer steps (0 = no limit)"),
    LONG("train.threads", train.threads, BTW, 0, 256, "0",
         "OpenBLAS threads per process (0 = library default)"),

    LONG("eval.every_steps", eval.every_steps, GE, 0, 0, "0",
         "evaluate every N steps (0 = at the end of each epoch only)"),
    LONG("eval.batch_size", eval.batch_size, BTW, 1, 65536, "1000", "samples per eval batch"),
    LONG("eval.patience", eval.patience, GE, 0, 0, "0",
         "evaluations without improvement before stopping (0 = never)"),
    LONG("eval.sample_tokens", eval.sample_tokens, BTW, 0, KD_EVAL_SAMPLE_MAX_TOKENS, "128",
         "language models: tokens of text the coordinator samples from the student at each "
         "evaluation (temperature 0.8, top 40, seeded by the run's seed), to TensorBoard's Text "
         "tab and metrics.jsonl as samples/student (0 = none)"),
    STR("eval.sample_prompt", eval.sample_prompt, 0, NULL, "",
        "language models: the text the samples continue (empty = a new document, from "
        "end-of-text)"),

    LONG("checkpoint.every_steps", checkpoint.every_steps, GE, 0, 0, "0",
         "checkpoint every N steps (0 = only at the end)"),
    LONG("checkpoint.keep", checkpoint.keep, BTW, 1, 1000, "3", "periodic checkpoints to keep"),

    LONG("cluster.workers", cluster.workers, BTW, 1, 1024, "2", "student workers"),
    LONG("cluster.teachers", cluster.teachers, BTW, 1, 64, "1", "teacher nodes"),
    LONG("cluster.start_workers", cluster.start_workers, BTW, 0, 1024, "0",
         "hold the first batches until this many workers are members, each time the coordinator "
         "starts, so an async run begins with its whole pool (0 = begin with the first worker)"),
    LONG("cluster.start_teachers", cluster.start_teachers, BTW, 0, 64, "0",
         "hold the first batches until this many teacher nodes are members, however long they "
         "take (0 = wait up to 2 s for cluster.teachers, then begin with those that came)"),
    ENUM("cluster.consistency", cluster.consistency, cons_ops, "sync",
         "gradient consistency model"),
    LONG("cluster.staleness", cluster.staleness, BTW, 0, 1000000, "2",
         "ssp: bound on how far a worker may run ahead, in steps"),
    LONG("cluster.heartbeat_ms", cluster.heartbeat_ms, BTW, 1, 3600000, "1000",
         "heartbeat interval"),
    LONG("cluster.heartbeat_timeout_ms", cluster.heartbeat_timeout_ms, BTW, 1, 86400000, "10000",
         "a node silent this long is declared dead"),
    LONG("cluster.restream_timeout_ms", cluster.restream_timeout_ms, BTW, 1, 86400000, "10000",
         "when no batch is applied for this long, unapplied batches are streamed again"),
    LONG("cluster.stream_hwm", cluster.stream_hwm, BTW, 1, 1000, "2",
         "batches queued per teacher-to-worker pipe (back-pressure)"),
    STR("cluster.bind", cluster.bind, 0, NULL, "tcp://127.0.0.1:*",
        "coordinator endpoint to bind; port * picks a free one"),
    BOOL("cluster.restart_failed", cluster.restart_failed, "false",
         "kdist run restarts a process that crashes (same role and id) instead of failing"),
    BOOL("cluster.shared_memory", cluster.shared_memory, "true",
         "workers on the coordinator's machine exchange weights and gradients through shared "
         "memory instead of TCP"),
    ENUM("cluster.wire", cluster.wire, wire_ops, "fp32",
         "weights and gradients over TCP: fp32, or bf16 / fp16 for half the bytes (rounded to "
         "nearest; the coordinator keeps fp32 weights and optimizer state and sums gradients in "
         "fp32; fp16 overflows past 65504, bf16 keeps fp32's range)"),
    LONG("cluster.accumulate", cluster.accumulate, BTW, 1, KD_MAX_ACCUMULATE, "1",
         "a worker sums the gradients of up to this many batches into one push, and the "
         "coordinator makes one update of their samples-weighted mean: k times fewer bytes "
         "per sample on the wire, and an update per k batches (the in-process trainer does the "
         "same)"),
    LONG("cluster.accumulate_wait_ms", cluster.accumulate_wait_ms, BTW, 0, 600000, "100",
         "a worker holding fewer than cluster.accumulate batches pushes them after waiting "
         "this long for the next (the coordinator's count of batches left ends an epoch "
         "without waiting)"),
    BOOL("cluster.overlap", cluster.overlap, "false",
         "over TCP, a worker sends its dense gradient in chunks; when that is the only "
         "gradient of its update (one worker, sync or async) the coordinator applies each "
         "chunk as it arrives and sends its new weights back at once, so the gradient going up "
         "and the weights coming down share the link's time (the same weights as without)"),
    FLOAT("cluster.topk_fraction", cluster.topk_fraction, BTW, 0, 1, "0",
          "over TCP, a worker pushes only this share of its gradient's values, the largest in "
          "magnitude (as index and cluster.wire value pairs), and adds the rest to its next "
          "gradient (error feedback); 0 = the whole gradient"),
    FLOAT("cluster.max_gradient_norm", cluster.max_gradient_norm, GE, 0, 0, "10000",
          "a pushed gradient whose L2 norm is larger is rejected like a non-finite one (0 = no "
          "bound)"),
    LONG("cluster.evict_after", cluster.evict_after, BTW, 1, 1000000, "3",
         "rejected gradients in a row from one member (while others are accepted) before it is "
         "evicted"),
    LONG("cluster.fail_after", cluster.fail_after, BTW, 1, 1000000, "20",
         "rejected gradients in a row across the cluster, none accepted between, before the run "
         "fails (training diverged)"),
    LONG("cluster.max_nacks", cluster.max_nacks, BTW, 1, 1000000, "5",
         "times one batch may be refused by workers (a nack) and recomputed before the run "
         "fails"),
    /* a sub-section: these keys stay last in `cluster` (the writer nests them there) */
    BOOL("cluster.security.curve", cluster.security.curve, "false",
         "encrypt and authenticate every connection with CurveZMQ (docs/security.md)"),
    STR("cluster.security.keys_dir", cluster.security.keys_dir, 0, NULL, "",
        "kdist run: directory of the key pairs of every role, made by `kdist keygen --cluster "
        "DIR`"),
    STR("cluster.security.coordinator_key", cluster.security.coordinator_key, 0, NULL, "",
        "the coordinator's public key (Z85, or a key file); the coordinator writes its own into "
        "the resolved recipe"),
    BOOL("cluster.security.allow_plaintext", cluster.security.allow_plaintext, "false",
         "let the coordinator and teachers bind a non-loopback address without CurveZMQ: anyone "
         "who reaches the port can join, read the weights and feed batches (a deliberately "
         "insecure cluster)"),
    STRLIST("cluster.security.authorized_keys", cluster.security.n_authorized_keys,
            cluster.security.authorized_keys, KD_MAX_AUTHORIZED_KEYS,
            "public keys that may join as a worker or a teacher node: Z85, key files or "
            "directories of .pub files (an override takes them comma-separated)"),
    STRLIST("cluster.security.worker_keys", cluster.security.n_worker_keys,
            cluster.security.worker_keys, KD_MAX_ROLE_KEYS,
            "public keys that may join as workers only (entries as in authorized_keys)"),
    STRLIST("cluster.security.teacher_keys", cluster.security.n_teacher_keys,
            cluster.security.teacher_keys, KD_MAX_ROLE_KEYS,
            "public keys that may join as teacher nodes only"),
    STRLIST("cluster.security.operator_keys", cluster.security.n_operator_keys,
            cluster.security.operator_keys, KD_MAX_ROLE_KEYS,
            "public keys that may stop, drain and checkpoint the run and read its status over "
            "the network (without them control goes only over the run directory's ipc channel)"),
    STRLIST("cluster.security.status_keys", cluster.security.n_status_keys,
            cluster.security.status_keys, KD_MAX_ROLE_KEYS,
            "public keys that may only read the run's status"),

    STR("logging.runs_dir", logging.runs_dir, 0, NULL, "runs", "directory holding run outputs"),
    LONG("logging.every_steps", logging.every_steps, BTW, 1, 1000000, "10",
         "write metrics every N optimizer steps"),
    ENUM("logging.level", logging.level, level_ops, "info", "log level"),
};
#define N_ROWS ((int)(sizeof schema / sizeof schema[0]))

/* Keys of a layer item besides `type`, per layer kind. Kinds without rows take only `type`. */
#define LFIELD(f) offsetof(kd_layer_spec_t, f)
#define LINT(kd, k, f, fl, lo, hi, d, doc)                                                         \
    {                                                                                              \
        .key = k, .type = T_INT, .off = LFIELD(f), .min = lo, .max = hi, .flags = fl, .def = d,    \
        .desc = doc, .kind = kd                                                                    \
    }
static const row_t layer_fields[] = {
    LINT(KD_LAYER_LINEAR, "out_features", out_features, F_REQ | BTW, 1, 1 << 24, NULL,
         "output features"),
    LINT(KD_LAYER_CONV2D, "out_channels", out_channels, F_REQ | BTW, 1, 1 << 16, NULL,
         "output channels"),
    LINT(KD_LAYER_CONV2D, "kernel", kernel, F_REQ | BTW, 1, 1024, NULL, "square kernel size"),
    LINT(KD_LAYER_CONV2D, "stride", stride, BTW, 1, 1024, "1", "stride"),
    LINT(KD_LAYER_CONV2D, "padding", padding, BTW, 0, 1024, "0", "zero padding on each side"),
    LINT(KD_LAYER_MAXPOOL2D, "kernel", kernel, F_REQ | BTW, 1, 1024, NULL, "square window size"),
    LINT(KD_LAYER_MAXPOOL2D, "stride", stride, BTW | F_DEF_KERNEL, 1, 1024, "kernel", "stride"),
    {.key = "p",
     .type = T_FLOAT,
     .off = LFIELD(p),
     .min = 0,
     .max = 1,
     .flags = F_REQ | BTW | F_MAX_OPEN,
     .def = NULL,
     .desc = "probability of zeroing an input",
     .kind = KD_LAYER_DROPOUT},
};
#define N_LAYER_FIELDS ((int)(sizeof layer_fields / sizeof layer_fields[0]))

static const row_t *find_row(const char *key) {
    for (int i = 0; i < N_ROWS; i++)
        if (strcmp(schema[i].key, key) == 0) return &schema[i];
    return NULL;
}

static const row_t *find_layer_field(kd_layer_kind_t kind, const char *key) {
    for (int i = 0; i < N_LAYER_FIELDS; i++)
        if (layer_fields[i].kind == kind && strcmp(layer_fields[i].key, key) == 0)
            return &layer_fields[i];
    return NULL;
}

/* Length of the section part of a dotted key ("optim.lr" -> 5); 0 for top-level keys. */
static size_t section_len(const char *key) {
    const char *dot = strchr(key, '.');
    return dot ? (size_t)(dot - key) : 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Did you mean                                                                             */

static int levenshtein(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    if (na > 64 || nb > 64) return 99;
    int row[65];
    for (size_t j = 0; j <= nb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= na; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= nb; j++) {
            int up = row[j];
            int best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[nb];
}

/* The closest candidate within edit distance 2, else the first one that `word` is a prefix of. */
static const char *suggest(const char *word, const char *const *cands, int n) {
    const char *best = NULL;
    int best_d = 3;
    for (int i = 0; i < n; i++) {
        int d = levenshtein(word, cands[i]);
        if (d < best_d) {
            best_d = d;
            best = cands[i];
        }
    }
    if (best) return best;
    size_t wl = strlen(word);
    if (wl < 2) return NULL;
    for (int i = 0; i < n; i++)
        if (strncmp(cands[i], word, wl) == 0) return cands[i];
    return NULL;
}

void kd_did_you_mean(const char *word, const char *const *cands, int n, char *out, size_t outlen) {
    const char *s = suggest(word, cands, n);
    if (s)
        snprintf(out, outlen, " (did you mean '%s'?)", s);
    else if (outlen)
        out[0] = 0;
}

static void enum_choices(const enum_ops_t *ops, char *out, size_t outlen) {
    size_t used = 0;
    out[0] = 0;
    for (int i = 0; i < ops->count && used < outlen; i++)
        used += (size_t)snprintf(out + used, outlen - used, "%s%s", i ? ", " : "", ops->name(i));
}

/* "between 1 and 65536", "> 0 and <= 100", ">= 0"; "" when unbounded. */
static void range_text(const row_t *k, char *out, size_t outlen) {
    int f = k->flags;
    if ((f & F_MIN) && (f & F_MAX) && !(f & (F_MIN_OPEN | F_MAX_OPEN))) {
        snprintf(out, outlen, "between %.9g and %.9g", k->min, k->max);
        return;
    }
    char lo[48] = "", hi[48] = "";
    if (f & F_MIN) snprintf(lo, sizeof lo, "%s %.9g", (f & F_MIN_OPEN) ? ">" : ">=", k->min);
    if (f & F_MAX) snprintf(hi, sizeof hi, "%s %.9g", (f & F_MAX_OPEN) ? "<" : "<=", k->max);
    snprintf(out, outlen, "%s%s%s", lo, (*lo && *hi) ? " and " : "", hi);
}

/* ---------------------------------------------------------------------------------------- */
/* Values                                                                                   */

/* YAML-ish numbers only: no inf/nan/hex that strtod would take. */
static int parse_number(const char *s, double *v) {
    if (!*s || strspn(s, "0123456789+-.eE") != strlen(s)) return -1;
    return kd_parse_double(s, v);
}

static int check_range(const row_t *k, double v, const char *text, char *msg, size_t n) {
    int f = k->flags;
    bool ok = true;
    if (f & F_MIN) ok = ok && ((f & F_MIN_OPEN) ? v > k->min : v >= k->min);
    if (f & F_MAX) ok = ok && ((f & F_MAX_OPEN) ? v < k->max : v <= k->max);
    if (ok) return 0;
    char range[128];
    range_text(k, range, sizeof range);
    return kd_err(msg, n, "must be %s, got %s", range, text);
}

/* A string of len bytes into a field of size bytes, checked by k->check when set. */
static int store_string(const row_t *k, char *field, const char *text, size_t len, char *msg,
                        size_t n) {
    if (len >= k->size)
        return kd_err(msg, n, "is too long (%zu bytes, at most %zu)", len, k->size - 1);
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)text[i] < 0x20 || text[i] == 0x7f)
            return kd_err(msg, n, "contains a control character");
    if (k->check && k->check(text, msg, n) != 0) return -1;
    /* zero the tail too, so equal recipes are equal bytes (memcmp-able) */
    memset(field, 0, k->size);
    memcpy(field, text, len);
    return 0;
}

/* A string list from override text: entries separated by commas (Z85 keys have none),
 * surrounding blanks dropped; "" or "[]" is the empty list. All or nothing. */
static int set_list_text(void *base, const row_t *k, const char *text, char *msg, size_t n) {
    char *array = (char *)base + k->off2;
    const int max = (int)k->max;
    char *entries = kd_xcalloc((size_t)max, k->size);
    int count = 0, rc = 0;
    bool empty = strspn(text, " ") == strlen(text) || strcmp(text, "[]") == 0;
    for (const char *p = text; !empty && rc == 0; p++) {
        const char *end = strchr(p, ',');
        if (!end) end = p + strlen(p);
        while (p < end && *p == ' ') p++;
        size_t len = (size_t)(end - p);
        while (len && p[len - 1] == ' ') len--;
        char piece[KD_ERR_LEN];
        if (len == 0) {
            rc = kd_err(msg, n, "entry %d is empty", count);
        } else if (count == max) {
            rc = kd_err(msg, n, "has more than %d entries", max);
        } else if (len >= sizeof piece) {
            rc = kd_err(msg, n, "entry %d is too long (%zu bytes, at most %zu)", count, len,
                        k->size - 1);
        } else {
            memcpy(piece, p, len);
            piece[len] = 0;
            char why[KD_ERR_LEN];
            if (store_string(k, entries + (size_t)count * k->size, piece, len, why, sizeof why))
                rc = kd_err(msg, n, "entry %d %s", count, why);
            count++;
        }
        p = end;
        if (!*p) break;
    }
    if (rc == 0) {
        memcpy(array, entries, (size_t)max * k->size);
        *(int *)((char *)base + k->off) = count;
    }
    free(entries);
    return rc;
}

/* Converts text for row k and stores it at base + k->off. Nothing is stored on error; msg
 * then says what is wrong (without location: callers add it). */
static int set_value(void *base, const row_t *k, const char *text, size_t len, char *msg,
                     size_t n) {
    char *field = (char *)base + k->off;
    if (strlen(text) != len) return kd_err(msg, n, "contains a NUL byte");
    switch (k->type) {
    case T_STR:
        return store_string(k, field, text, len, msg, n);
    case T_STRLIST:
        return set_list_text(base, k, text, msg, n);
    case T_LONG:
    case T_INT: {
        double d;
        long l;
        if (strspn(text, "0123456789+-") == len && kd_parse_long(text, &l) == 0) {
            d = (double)l;
        } else {
            if (parse_number(text, &d) != 0 || d != floor(d))
                return kd_err(msg, n, "expected a whole number, got '%s'", text);
            if (fabs(d) > 9007199254740992.0) return kd_err(msg, n, "%s is too large", text);
            l = (long)d;
        }
        if (check_range(k, d, text, msg, n) != 0) return -1;
        if (k->type == T_INT) {
            KD_ASSERT(k->flags & F_MAX); /* int fields need bounds that fit an int */
            *(int *)field = (int)l;
        } else {
            *(long *)field = l;
        }
        return 0;
    }
    case T_FLOAT: {
        double d;
        if (parse_number(text, &d) != 0) return kd_err(msg, n, "expected a number, got '%s'", text);
        if (fabs(d) > FLT_MAX) return kd_err(msg, n, "%s does not fit a 32-bit float", text);
        if (check_range(k, d, text, msg, n) != 0) return -1;
        *(float *)field = (float)d;
        return 0;
    }
    case T_BOOL: {
        static const char *const yes[] = {"true", "True", "TRUE"}, *const no[] = {"false", "False",
                                                                                  "FALSE"};
        for (int i = 0; i < 3; i++) {
            if (strcmp(text, yes[i]) == 0 || strcmp(text, no[i]) == 0) {
                *(bool *)field = strcmp(text, yes[i]) == 0;
                return 0;
            }
        }
        return kd_err(msg, n, "expected true or false, got '%s'", text);
    }
    case T_ENUM: {
        int v;
        if (k->ops->parse(text, &v) == 0) {
            k->ops->store(field, v);
            return 0;
        }
        char choices[256], dym[96];
        const char *names[64];
        for (int i = 0; i < k->ops->count; i++) names[i] = k->ops->name(i);
        enum_choices(k->ops, choices, sizeof choices);
        kd_did_you_mean(text, names, k->ops->count, dym, sizeof dym);
        return kd_err(msg, n, "expected one of: %s, got '%s'%s", choices, text, dym);
    }
    case T_LAYERS:
        break;
    }
    KD_ASSERT(!"set_value: unsupported type");
    return -1;
}

/* The value as recipe text that set_value reads back to the same bits. */
static void format_value(const void *base, const row_t *k, char *out, size_t n) {
    const char *field = (const char *)base + k->off;
    switch (k->type) {
    case T_STR: {
        /* always double-quoted: safe for ':', '#', leading spaces, "true", "123", "" ... */
        size_t used = 0;
        out[used++] = '"';
        for (const char *p = field; *p && used + 3 < n; p++) {
            if (*p == '"' || *p == '\\') out[used++] = '\\';
            out[used++] = *p;
        }
        out[used++] = '"';
        out[used] = 0;
        return;
    }
    case T_LONG:
        snprintf(out, n, "%ld", *(const long *)field);
        return;
    case T_INT:
        snprintf(out, n, "%d", *(const int *)field);
        return;
    case T_FLOAT: {
        /* shortest %g that reads back to the same float (at most 9 digits) */
        float f = *(const float *)field;
        for (int prec = 6; prec <= 9; prec++) {
            snprintf(out, n, "%.*g", prec, (double)f);
            if ((float)strtod(out, NULL) == f) break;
        }
        return;
    }
    case T_BOOL:
        snprintf(out, n, "%s", *(const bool *)field ? "true" : "false");
        return;
    case T_ENUM:
        snprintf(out, n, "%s", k->ops->name(k->ops->load(field)));
        return;
    case T_LAYERS:
    case T_STRLIST:
        break;
    }
    KD_ASSERT(!"format_value: unsupported type");
}

/* ---------------------------------------------------------------------------------------- */
/* Defaults, overrides                                                                      */

void kd_recipe_defaults(kd_recipe_t *r) {
    memset(r, 0, sizeof *r);
    char msg[KD_ERR_LEN];
    for (int i = 0; i < N_ROWS; i++) {
        const row_t *k = &schema[i];
        if (!k->def || k->type == T_LAYERS) continue;
        int rc = set_value(r, k, k->def, strlen(k->def), msg, sizeof msg);
        KD_ASSERT(rc == 0); /* a schema default must satisfy its own schema */
    }
}

static int apply_override(kd_recipe_t *r, const char *assignment, bool *seen, char *err,
                          size_t errlen) {
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        return kd_err(err, errlen, "override '%s': expected section.key=value", assignment);
    char key[128];
    if ((size_t)(eq - assignment) >= sizeof key)
        return kd_err(err, errlen, "override '%s': key is too long", assignment);
    snprintf(key, sizeof key, "%.*s", (int)(eq - assignment), assignment);
    const row_t *k = find_row(key);
    if (!k) {
        const char *names[N_ROWS];
        char dym[160];
        for (int i = 0; i < N_ROWS; i++) names[i] = schema[i].key;
        kd_did_you_mean(key, names, N_ROWS, dym, sizeof dym);
        return kd_err(err, errlen, "override '%s': unknown key '%s'%s", assignment, key, dym);
    }
    if (k->type == T_LAYERS)
        return kd_err(err, errlen,
                      "override '%s': layer lists cannot be overridden on the command line; "
                      "edit %s in the recipe",
                      assignment, k->key);
    char msg[KD_ERR_LEN];
    if (set_value(r, k, eq + 1, strlen(eq + 1), msg, sizeof msg) != 0)
        return kd_err(err, errlen, "override '%s': %s", assignment, msg);
    if (seen) seen[k - schema] = true;
    return 0;
}

int kd_recipe_set(kd_recipe_t *r, const char *assignment, char *err, size_t errlen) {
    return apply_override(r, assignment, NULL, err, errlen);
}

/* ---------------------------------------------------------------------------------------- */
/* YAML                                                                                     */

typedef struct {
    const char *name; /* file name for messages */
    const char *text;
    size_t len;
    yaml_document_t *doc;
    kd_recipe_t *r;
    bool seen[N_ROWS];
    char *err;
    size_t errlen;
} pctx_t;

int kd_loc_verr(char *err, size_t errlen, const char *name, const char *text, size_t len,
                size_t line, size_t col, const char *fmt, va_list ap) {
    char msg[KD_ERR_LEN];
    vsnprintf(msg, sizeof msg, fmt, ap);
    const char *p = text, *end = text + len;
    for (size_t l = 0; l < line && p < end; p++)
        if (*p == '\n') l++;
    char src[161], caret[161];
    size_t ns = 0, nc = 0, c = 0;
    for (; p < end && *p != '\n' && *p != '\r' && ns < sizeof src - 1; p++) {
        unsigned char ch = (unsigned char)*p;
        src[ns++] = (ch < 0x20 && ch != '\t') || ch == 0x7f ? '?' : (char)ch;
        /* libyaml counts characters, not bytes: UTF-8 continuation bytes do not move it */
        if (c < col && (ch & 0xC0) != 0x80 && nc < sizeof caret - 2) {
            caret[nc++] = ch == '\t' ? '\t' : ' ';
            c++;
        }
    }
    src[ns] = 0;
    caret[nc++] = '^';
    caret[nc] = 0;
    return kd_err(err, errlen, "%s:%zu:%zu: %s\n%s\n%s", name, line + 1, col + 1, msg, src, caret);
}

int kd_loc_err(char *err, size_t errlen, const char *name, const char *text, size_t len,
               size_t line, size_t col, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int rc = kd_loc_verr(err, errlen, name, text, len, line, col, fmt, ap);
    va_end(ap);
    return rc;
}

/* A located error at libyaml mark m of the document being parsed. */
static int loc_err(pctx_t *c, yaml_mark_t m, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int loc_err(pctx_t *c, yaml_mark_t m, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int rc = kd_loc_verr(c->err, c->errlen, c->name, c->text, c->len, m.line, m.column, fmt, ap);
    va_end(ap);
    return rc;
}

static yaml_node_t *node_at(pctx_t *c, int id) {
    return yaml_document_get_node(c->doc, id);
}

static const char *node_kind(const yaml_node_t *n) {
    return n->type == YAML_MAPPING_NODE    ? "a mapping"
           : n->type == YAML_SEQUENCE_NODE ? "a list"
                                           : "a scalar";
}

static const char *scalar_text(const yaml_node_t *n) {
    return (const char *)n->data.scalar.value;
}

static const char *type_word(vtype_t t) {
    switch (t) {
    case T_STR:
        return "a string";
    case T_LONG:
    case T_INT:
        return "a whole number";
    case T_FLOAT:
        return "a number";
    case T_BOOL:
        return "true or false";
    case T_ENUM:
        return "one of the names listed in docs/recipe.md";
    case T_LAYERS:
        return "a list of layers";
    case T_STRLIST:
        return "a list of strings";
    }
    return "?";
}

/* Mapping keys must be scalars and appear once; returns the key text or NULL (error set). */
static const char *mapping_key(pctx_t *c, yaml_node_t *map, yaml_node_pair_t *pair) {
    yaml_node_t *kn = node_at(c, pair->key);
    if (kn->type != YAML_SCALAR_NODE) {
        loc_err(c, kn->start_mark, "keys must be plain words, got %s", node_kind(kn));
        return NULL;
    }
    const char *key = scalar_text(kn);
    for (yaml_node_pair_t *q = map->data.mapping.pairs.start; q < pair; q++) {
        yaml_node_t *qk = node_at(c, q->key);
        if (qk->type == YAML_SCALAR_NODE && strcmp(scalar_text(qk), key) == 0) {
            loc_err(c, kn->start_mark, "duplicate key '%s' (first given at line %zu)", key,
                    (size_t)qk->start_mark.line + 1);
            return NULL;
        }
    }
    return key;
}

/* A scalar value onto row k of base; label names the key in messages. */
static int set_node(pctx_t *c, void *base, const row_t *k, const char *label, yaml_node_t *v) {
    if (v->type != YAML_SCALAR_NODE) {
        if (k->type == T_ENUM) {
            char choices[256];
            enum_choices(k->ops, choices, sizeof choices);
            return loc_err(c, v->start_mark, "%s: expected one of: %s, got %s", label, choices,
                           node_kind(v));
        }
        return loc_err(c, v->start_mark, "%s: expected %s, got %s", label, type_word(k->type),
                       node_kind(v));
    }
    char msg[KD_ERR_LEN];
    if (set_value(base, k, scalar_text(v), v->data.scalar.length, msg, sizeof msg) != 0)
        return loc_err(c, v->start_mark, "%s: %s", label, msg);
    return 0;
}

static int parse_layer(pctx_t *c, const char *list, int idx, yaml_node_t *item,
                       kd_layer_spec_t *spec) {
    char where[96];
    snprintf(where, sizeof where, "%s[%d]", list, idx);
    const char *kinds[KD_LAYER_KIND_COUNT];
    char choices[256];
    for (int i = 0; i < KD_LAYER_KIND_COUNT; i++) kinds[i] = layer_ops.name(i);
    enum_choices(&layer_ops, choices, sizeof choices);
    if (item->type != YAML_MAPPING_NODE)
        return loc_err(c, item->start_mark,
                       "%s: expected a mapping like {type: linear, out_features: 10}, got %s%s%s%s",
                       where, node_kind(item), item->type == YAML_SCALAR_NODE ? " '" : "",
                       item->type == YAML_SCALAR_NODE ? scalar_text(item) : "",
                       item->type == YAML_SCALAR_NODE ? "'" : "");

    /* type first: it decides which other keys are valid */
    memset(spec, 0, sizeof *spec);
    yaml_node_t *type_node = NULL;
    yaml_node_pair_t *pairs = item->data.mapping.pairs.start, *pend = item->data.mapping.pairs.top;
    for (yaml_node_pair_t *p = pairs; p < pend; p++) {
        const char *key = mapping_key(c, item, p);
        if (!key) return -1;
        if (strcmp(key, "type") == 0) type_node = node_at(c, p->value);
    }
    if (!type_node)
        return loc_err(c, item->start_mark, "%s: missing 'type' (one of: %s)", where, choices);
    if (type_node->type != YAML_SCALAR_NODE)
        return loc_err(c, type_node->start_mark, "%s: type: expected one of: %s, got %s", where,
                       choices, node_kind(type_node));
    int kind;
    if (layer_ops.parse(scalar_text(type_node), &kind) != 0) {
        char dym[300];
        kd_did_you_mean(scalar_text(type_node), kinds, KD_LAYER_KIND_COUNT, dym, sizeof dym);
        if (!*dym) snprintf(dym, sizeof dym, " (expected one of: %s)", choices);
        return loc_err(c, type_node->start_mark, "%s: unknown layer type '%s'%s", where,
                       scalar_text(type_node), dym);
    }
    spec->kind = (kd_layer_kind_t)kind;
    const char *kname = layer_ops.name(kind);

    bool given[N_LAYER_FIELDS] = {false};
    for (yaml_node_pair_t *p = pairs; p < pend; p++) {
        const char *key = scalar_text(node_at(c, p->key));
        if (strcmp(key, "type") == 0) continue;
        const row_t *f = find_layer_field(spec->kind, key);
        if (!f) {
            const char *valid[N_LAYER_FIELDS + 1];
            int nv = 0;
            char list_txt[160] = "'type'", dym[200];
            for (int i = 0; i < N_LAYER_FIELDS; i++) {
                if (layer_fields[i].kind != spec->kind) continue;
                valid[nv++] = layer_fields[i].key;
                size_t u = strlen(list_txt);
                snprintf(list_txt + u, sizeof list_txt - u, ", '%s'", layer_fields[i].key);
            }
            kd_did_you_mean(key, valid, nv, dym, sizeof dym);
            if (!*dym) snprintf(dym, sizeof dym, " (valid keys: %s)", list_txt);
            return loc_err(c, node_at(c, p->key)->start_mark,
                           "%s: unknown key '%s' for a %s layer%s", where, key, kname, dym);
        }
        char label[160];
        snprintf(label, sizeof label, "%s.%s", where, key);
        if (set_node(c, spec, f, label, node_at(c, p->value)) != 0) return -1;
        given[f - layer_fields] = true;
    }
    /* defaults after the given keys: maxpool2d's stride defaults to its kernel */
    for (int i = 0; i < N_LAYER_FIELDS; i++) {
        const row_t *f = &layer_fields[i];
        if (f->kind != spec->kind || given[i]) continue;
        if (f->flags & F_REQ)
            return loc_err(c, item->start_mark, "%s: missing required key '%s' for a %s layer",
                           where, f->key, kname);
        if (f->flags & F_DEF_KERNEL) {
            spec->stride = spec->kernel;
        } else {
            char msg[KD_ERR_LEN];
            int rc = set_value(spec, f, f->def, strlen(f->def), msg, sizeof msg);
            KD_ASSERT(rc == 0);
        }
    }
    return 0;
}

/* The items of v, a list (shape says what it should look like) of at most max of them (noun):
 * their count, or -1 with the error set. */
static long list_items(pctx_t *c, const row_t *k, yaml_node_t *v, const char *shape,
                       const char *noun, long max, yaml_node_item_t **items) {
    if (v->type != YAML_SEQUENCE_NODE)
        return loc_err(c, v->start_mark, "%s: expected %s, got %s", k->key, shape, node_kind(v));
    *items = v->data.sequence.items.start;
    long n = v->data.sequence.items.top - *items;
    if (n > max)
        return loc_err(c, v->start_mark, "%s: too many %s (%ld, at most %ld)", k->key, noun, n,
                       max);
    return n;
}

static int parse_layers(pctx_t *c, const row_t *k, yaml_node_t *v) {
    yaml_node_item_t *items = NULL;
    long n =
        list_items(c, k, v, "a list of layers (- {type: ...})", "layers", KD_MAX_LAYERS, &items);
    if (n < 0) return -1;
    if (n == 0 && (k->flags & F_REQ))
        return loc_err(c, v->start_mark, "%s: must list at least one layer", k->key);
    kd_layer_spec_t specs[KD_MAX_LAYERS];
    memset(specs, 0, sizeof specs);
    for (long i = 0; i < n; i++)
        if (parse_layer(c, k->key, (int)i, node_at(c, items[i]), &specs[i]) != 0) return -1;
    char *base = (char *)c->r;
    memcpy(base + k->off2, specs, sizeof specs);
    *(int *)(base + k->off) = (int)n;
    return 0;
}

/* A list of strings (cluster.security.authorized_keys): a YAML sequence of scalars. */
static int parse_strlist(pctx_t *c, const row_t *k, yaml_node_t *v) {
    yaml_node_item_t *items = NULL;
    long n = list_items(c, k, v, "a list of strings (- \"...\")", "entries", (long)k->max, &items);
    if (n < 0) return -1;
    char *base = (char *)c->r;
    char *array = kd_xcalloc((size_t)k->max, k->size);
    for (long i = 0; i < n; i++) {
        yaml_node_t *item = node_at(c, items[i]);
        char label[160], msg[KD_ERR_LEN];
        snprintf(label, sizeof label, "%s[%ld]", k->key, i);
        int rc = 0;
        if (item->type != YAML_SCALAR_NODE)
            rc = loc_err(c, item->start_mark, "%s: expected a string, got %s", label,
                         node_kind(item));
        else if (item->data.scalar.length == 0 ||
                 strlen(scalar_text(item)) != item->data.scalar.length)
            rc = loc_err(c, item->start_mark, "%s: %s", label,
                         item->data.scalar.length ? "contains a NUL byte" : "must not be empty");
        else if (store_string(k, array + (size_t)i * k->size, scalar_text(item),
                              item->data.scalar.length, msg, sizeof msg) != 0)
            rc = loc_err(c, item->start_mark, "%s: %s", label, msg);
        if (rc) {
            free(array);
            return -1;
        }
    }
    memcpy(base + k->off2, array, (size_t)k->max * k->size);
    *(int *)(base + k->off) = (int)n;
    free(array);
    return 0;
}

static int parse_entry(pctx_t *c, const row_t *k, yaml_node_t *v) {
    int rc = k->type == T_LAYERS    ? parse_layers(c, k, v)
             : k->type == T_STRLIST ? parse_strlist(c, k, v)
                                    : set_node(c, c->r, k, k->key, v);
    if (rc == 0) c->seen[k - schema] = true;
    return rc;
}

/* Whether some key lives below the dotted path `sec` ("cluster.security"). */
static bool has_keys_below(const char *sec) {
    size_t sl = strlen(sec);
    for (int i = 0; i < N_ROWS; i++)
        if (strncmp(schema[i].key, sec, sl) == 0 && schema[i].key[sl] == '.') return true;
    return false;
}

/* The names one level below `sec` (keys and sub-sections, each once; "": the top level), for
 * did-you-mean. */
static int names_below(const char *sec, const char **out, char (*store)[32]) {
    size_t sl = strlen(sec);
    int n = 0;
    for (int i = 0; i < N_ROWS; i++) {
        const char *key = schema[i].key;
        if (sl && (strncmp(key, sec, sl) != 0 || key[sl] != '.')) continue;
        const char *name = sl ? key + sl + 1 : key;
        size_t len = strcspn(name, ".");
        snprintf(store[n], sizeof store[n], "%.*s", (int)len, name);
        bool known = false;
        for (int j = 0; j < n && !known; j++) known = strcmp(out[j], store[n]) == 0;
        if (!known) {
            out[n] = store[n];
            n++;
        }
    }
    return n;
}

/* An unknown key in the mapping of sec ("": the top level), with what to write instead. */
static int unknown_key(pctx_t *c, const char *sec, yaml_node_pair_t *p, const char *key) {
    const char *names[N_ROWS];
    char store[N_ROWS][32], hint[160];
    const char *dot = strchr(key, '.');
    if (dot)
        snprintf(hint, sizeof hint, " (write it nested: %.*s: {%.40s: ...})",
                 (int)(dot - key < 40 ? dot - key : 40), key, dot + 1);
    else
        kd_did_you_mean(key, names, names_below(sec, names, store), hint, sizeof hint);
    yaml_mark_t m = node_at(c, p->key)->start_mark;
    if (sec[0]) return loc_err(c, m, "unknown key '%s' in '%s'%s", key, sec, hint);
    return loc_err(c, m, "unknown %s '%s'%s",
                   node_at(c, p->value)->type == YAML_MAPPING_NODE ? "section" : "key", key, hint);
}

/* The keys of a mapping: the document's (sec "") or a section's ("cluster", or a sub-section
 * such as "cluster.security"). A key is a plain word: "train.epochs" is written nested. */
static int parse_mapping(pctx_t *c, const char *sec, yaml_node_t *map) {
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        const char *key = mapping_key(c, map, p);
        if (!key) return -1;
        char full[160];
        snprintf(full, sizeof full, "%s%s%s", sec, sec[0] ? "." : "", key);
        yaml_node_t *v = node_at(c, p->value);
        bool dotted = strchr(key, '.') != NULL;
        const row_t *k = dotted ? NULL : find_row(full);
        if (k) {
            if (parse_entry(c, k, v) != 0) return -1;
        } else if (!dotted && has_keys_below(full)) {
            if (v->type != YAML_MAPPING_NODE)
                return loc_err(c, v->start_mark, "section '%s' must be a mapping of keys, got %s",
                               full, node_kind(v));
            if (parse_mapping(c, full, v) != 0) return -1;
        } else {
            return unknown_key(c, sec, p, key);
        }
    }
    return 0;
}

/* Where a missing key would go: its section's mapping if present, else the document root. */
/* What the keys cannot say one at a time: a student is a list of layers or a GPT, and a GPT
 * reads language-model data. NULL when fine, else the key to point at (why set). */
static const char *check_models(const kd_recipe_t *r, bool layers_given, char *why, size_t n) {
    const bool lm = kd_recipe_is_lm(r), gpt = r->student.gpt.layers > 0;
    if (gpt && r->student.n_layers > 0)
        return kd_err(why, n, "student: give student.layers or student.gpt, not both"),
               "student.layers";
    if (!gpt && r->student.n_layers == 0)
        return kd_err(why, n,
                      layers_given ? "student.layers: must list at least one layer (or give a "
                                     "student.gpt model)"
                                   : "missing required key 'student.layers' (or a student.gpt "
                                     "model)"),
               "student.layers";
    if (lm && !gpt)
        return kd_err(why, n, "data.format %s needs a GPT student (student.gpt), not layers",
                      kd_data_format_name(r->data.format)),
               "student.layers";
    if (!lm && (gpt || r->teacher.gpt.layers > 0))
        return kd_err(why, n, "a GPT model needs data.format text or tokens (got images)"),
               "data.format";
    if (lm && r->teacher.n_layers > 0)
        return kd_err(why, n, "teacher: a language-model recipe takes teacher.gpt, not layers"),
               "teacher.layers";
    if (r->cache.encoding == KD_ENC_SAMPLED && !lm)
        return kd_err(why, n,
                      "cache.encoding sampled is for language models (data.format text or tokens); "
                      "images take fp32, fp16, int8 or topk"),
               "cache.encoding";
    if (r->cache.encoding == KD_ENC_SAMPLED && r->distill.loss.divergence != KD_DIV_FORWARD_KL)
        return kd_err(why, n,
                      "distill.loss %s with cache.encoding sampled: the draws give an unbiased "
                      "estimate of forward_kl only (the other divergences are not linear in the "
                      "teacher's probabilities); use forward_kl, or topk / a dense encoding",
                      kd_divergence_name(r->distill.loss.divergence)),
               "distill.loss";
    if (lm && r->data.n_files == 0)
        return kd_err(why, n, "data.format %s needs data.files",
                      kd_data_format_name(r->data.format)),
               "data.files";
    return NULL;
}

static yaml_mark_t missing_mark(pctx_t *c, const char *key) {
    yaml_node_t *root = yaml_document_get_root_node(c->doc);
    yaml_mark_t m = {0, 0, 0};
    if (!root) return m;
    m = root->start_mark;
    size_t sl = section_len(key);
    if (sl == 0 || root->type != YAML_MAPPING_NODE) return m;
    for (yaml_node_pair_t *p = root->data.mapping.pairs.start; p < root->data.mapping.pairs.top;
         p++) {
        yaml_node_t *kn = node_at(c, p->key);
        if (kn->type == YAML_SCALAR_NODE && strlen(scalar_text(kn)) == sl &&
            strncmp(scalar_text(kn), key, sl) == 0)
            return node_at(c, p->value)->start_mark;
    }
    return m;
}

/* Where a dotted key's value is in the document; where its section is (missing_mark) when the
 * key is not there. */
static yaml_mark_t key_mark(pctx_t *c, const char *key) {
    yaml_node_t *node = yaml_document_get_root_node(c->doc);
    for (const char *part = key; node && node->type == YAML_MAPPING_NODE;) {
        size_t len = strcspn(part, ".");
        yaml_node_t *next = NULL;
        for (yaml_node_pair_t *p = node->data.mapping.pairs.start;
             p < node->data.mapping.pairs.top && !next; p++) {
            yaml_node_t *kn = node_at(c, p->key);
            if (kn->type == YAML_SCALAR_NODE && strlen(scalar_text(kn)) == len &&
                strncmp(scalar_text(kn), part, len) == 0)
                next = node_at(c, p->value);
        }
        if (!next) break;
        if (part[len] == 0) return next->start_mark;
        node = next;
        part += len + 1;
    }
    return missing_mark(c, key);
}

/* Aliases would let one node appear under several keys (and build cycles); recipes are small
 * enough to write out, so they are refused. */
static int reject_aliases(pctx_t *c) {
    yaml_document_t *d = c->doc;
    int n = (int)(d->nodes.top - d->nodes.start);
    if (n == 0) return 0;
    unsigned char *refs = kd_xcalloc((size_t)n + 1, 1);
    int bad = 0;
    refs[1] = 1; /* the root */
    for (int id = 1; id <= n && !bad; id++) {
        yaml_node_t *nd = node_at(c, id);
        if (nd->type == YAML_SEQUENCE_NODE) {
            for (yaml_node_item_t *it = nd->data.sequence.items.start;
                 it < nd->data.sequence.items.top && !bad; it++)
                if (refs[*it]++) bad = *it;
        } else if (nd->type == YAML_MAPPING_NODE) {
            for (yaml_node_pair_t *p = nd->data.mapping.pairs.start;
                 p < nd->data.mapping.pairs.top && !bad; p++) {
                if (refs[p->key]++)
                    bad = p->key;
                else if (refs[p->value]++)
                    bad = p->value;
            }
        }
    }
    free(refs);
    if (bad)
        return loc_err(c, node_at(c, bad)->start_mark,
                       "YAML anchors and aliases are not supported in recipes; write the value "
                       "out");
    return 0;
}

static int parse_root(pctx_t *c) {
    yaml_node_t *root = yaml_document_get_root_node(c->doc);
    if (!root) {
        yaml_mark_t m = {0, 0, 0};
        return loc_err(c, m, "the recipe is empty (expected a mapping with name, student, ...)");
    }
    if (reject_aliases(c) != 0) return -1;
    if (root->type != YAML_MAPPING_NODE)
        return loc_err(c, root->start_mark, "a recipe must be a mapping of sections, got %s",
                       node_kind(root));
    return parse_mapping(c, "", root);
}

int kd_yaml_syntax_err(const struct yaml_parser_s *ps, const char *name, const char *text,
                       size_t len, char *err, size_t errlen) {
    size_t line = ps->problem_mark.line, col = ps->problem_mark.column;
    const char *problem = ps->problem ? ps->problem : "syntax error";
    if (ps->error == YAML_MEMORY_ERROR) return kd_err(err, errlen, "%s: out of memory", name);
    if (ps->error == YAML_READER_ERROR) {
        /* reader errors carry a byte offset, not a mark */
        line = col = 0;
        for (size_t i = 0; i < ps->problem_offset && i < len; i++) {
            if (text[i] == '\n') {
                line++;
                col = 0;
            } else if (((unsigned char)text[i] & 0xC0) != 0x80) {
                col++;
            }
        }
        return kd_loc_err(err, errlen, name, text, len, line, col, "invalid YAML: %s (byte 0x%02x)",
                          ps->problem ? ps->problem : "unreadable input", ps->problem_value & 0xff);
    }
    if (ps->context)
        return kd_loc_err(err, errlen, name, text, len, line, col,
                          "invalid YAML: %s (%s at line %zu column %zu)", problem, ps->context,
                          (size_t)ps->context_mark.line + 1, (size_t)ps->context_mark.column + 1);
    return kd_loc_err(err, errlen, name, text, len, line, col, "invalid YAML: %s", problem);
}

static int syntax_error(pctx_t *c, const yaml_parser_t *ps) {
    return kd_yaml_syntax_err(ps, c->name, c->text, c->len, c->err, c->errlen);
}

int kd_recipe_parse(const char *name, const char *text, size_t len, const char *const *overrides,
                    int n_overrides, kd_recipe_t *out, char *err, size_t errlen) {
    pctx_t *c = kd_xcalloc(1, sizeof *c);
    kd_recipe_t *r = kd_xmalloc(sizeof *r);
    yaml_parser_t ps;
    yaml_document_t doc, extra;
    bool have_doc = false, have_parser = false;
    int rc = -1;
    kd_recipe_defaults(r);
    c->name = name ? name : "<recipe>";
    c->text = text;
    c->len = len;
    c->doc = &doc;
    c->r = r;
    c->err = err;
    c->errlen = errlen;

    if (!yaml_parser_initialize(&ps)) {
        kd_err(err, errlen, "%s: cannot initialise the YAML parser", c->name);
        goto cleanup;
    }
    have_parser = true;
    yaml_parser_set_input_string(&ps, (const unsigned char *)text, len);
    if (!yaml_parser_load(&ps, &doc)) {
        syntax_error(c, &ps);
        goto cleanup;
    }
    have_doc = true;
    if (parse_root(c) != 0) goto cleanup;
    /* a second document would be silently ignored: refuse it */
    if (!yaml_parser_load(&ps, &extra)) {
        syntax_error(c, &ps);
        goto cleanup;
    }
    yaml_node_t *extra_root = yaml_document_get_root_node(&extra);
    yaml_mark_t extra_mark = extra_root ? extra_root->start_mark : extra.start_mark;
    yaml_document_delete(&extra);
    if (extra_root) {
        loc_err(c, extra_mark, "a recipe is a single YAML document; found a second one");
        goto cleanup;
    }
    for (int i = 0; i < n_overrides; i++)
        if (apply_override(r, overrides[i], c->seen, err, errlen) != 0) goto cleanup;
    for (int i = 0; i < N_ROWS; i++) {
        if ((schema[i].flags & F_REQ) && !c->seen[i]) {
            loc_err(c, missing_mark(c, schema[i].key), "missing required key '%s'", schema[i].key);
            goto cleanup;
        }
    }
    char why[KD_ERR_LEN];
    bool layers_given = false;
    for (int i = 0; i < N_ROWS; i++)
        if (strcmp(schema[i].key, "student.layers") == 0) layers_given = c->seen[i];
    const char *at = check_models(r, layers_given, why, sizeof why);
    if (at) {
        loc_err(c, key_mark(c, at), "%s", why);
        goto cleanup;
    }
    memcpy(out, r, sizeof *r);
    rc = 0;
cleanup:
    if (have_doc) yaml_document_delete(&doc);
    if (have_parser) yaml_parser_delete(&ps);
    free(r);
    free(c);
    return rc;
}

int kd_recipe_check_cluster(const kd_recipe_t *r, const char *path, char *err, size_t errlen) {
    if (r->distill.loss.alpha <= 0 || r->cache.import[0]) return 0;
    const bool lm = kd_recipe_is_lm(r);
    if ((lm ? r->teacher.gpt.layers == 0 : r->teacher.n_layers == 0) || !r->teacher.checkpoint[0])
        return kd_err(err, errlen,
                      "%s: distill.alpha is %g but there is no teacher: set %s and "
                      "teacher.checkpoint, or cache.import to distil from imported logits",
                      path, (double)r->distill.loss.alpha, lm ? "teacher.gpt" : "teacher.layers");
    return 0;
}

int kd_recipe_load(const char *path, const char *const *overrides, int n_overrides,
                   kd_recipe_t *out, char *err, size_t errlen) {
    uint8_t *data;
    size_t len;
    if (kd_read_file(path, &data, &len, err, errlen) != 0) return -1;
    int rc =
        kd_recipe_parse(path, (const char *)data, len, overrides, n_overrides, out, err, errlen);
    free(data);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Writing                                                                                  */

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

static void bprintf(buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bprintf(buf_t *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        KD_ASSERT(n >= 0);
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = (b->cap + (size_t)n + 1) * 2;
        char *np = kd_xmalloc(cap);
        memcpy(np, b->p, b->len + 1);
        free(b->p);
        b->p = np;
        b->cap = cap;
    }
}

static void write_layers(buf_t *b, const kd_layer_spec_t *specs, int n) {
    if (n == 0) {
        bprintf(b, " []\n");
        return;
    }
    bprintf(b, "\n");
    for (int i = 0; i < n; i++) {
        bprintf(b, "    - {type: %s", layer_ops.name(specs[i].kind));
        for (int j = 0; j < N_LAYER_FIELDS; j++) {
            if (layer_fields[j].kind != specs[i].kind) continue;
            char v[64];
            format_value(&specs[i], &layer_fields[j], v, sizeof v);
            bprintf(b, ", %s: %s", layer_fields[j].key, v);
        }
        bprintf(b, "}\n");
    }
}

static void write_strlist(buf_t *b, const row_t *k, const kd_recipe_t *r, int indent) {
    const char *base = (const char *)r;
    int n = *(const int *)(base + k->off);
    if (n == 0) {
        bprintf(b, " []\n");
        return;
    }
    bprintf(b, "\n");
    row_t one = *k; /* each entry written as a string of the entry's size */
    one.type = T_STR;
    for (int i = 0; i < n; i++) {
        char v[2 * KD_AUTHORIZED_KEY_MAX + 8];
        one.off = k->off2 + (size_t)i * k->size;
        format_value(r, &one, v, sizeof v);
        bprintf(b, "%*s- %s\n", indent + 2, "", v);
    }
}

/* How many leading dotted components two keys share ("cluster.security.curve" and
 * "cluster.bind" share 1), counting only section components (not the last). */
static int shared_sections(const char *a, const char *b) {
    int n = 0;
    for (;;) {
        const char *da = strchr(a, '.'), *db = strchr(b, '.');
        if (!da || !db || da - a != db - b || strncmp(a, b, (size_t)(da - a)) != 0) return n;
        n++;
        a = da + 1;
        b = db + 1;
    }
}

char *kd_recipe_to_yaml(const kd_recipe_t *r) {
    buf_t b = {kd_xmalloc(4096), 0, 4096};
    b.p[0] = 0;
    bprintf(&b, "# kdist recipe (resolved: every key, defaults included)\n");
    for (int i = 0; i < N_ROWS; i++) {
        const row_t *k = &schema[i];
        /* open the sections this key is in that the previous key was not */
        int shared = i ? shared_sections(schema[i - 1].key, k->key) : 0, depth = 0;
        const char *key = k->key;
        for (const char *dot; (dot = strchr(key, '.')); key = dot + 1, depth++)
            if (depth >= shared) bprintf(&b, "%*s%.*s:\n", 2 * depth, "", (int)(dot - key), key);
        bprintf(&b, "%*s%s:", 2 * depth, "", key);
        if (k->type == T_LAYERS) {
            const char *base = (const char *)r;
            write_layers(&b, (const kd_layer_spec_t *)(base + k->off2),
                         *(const int *)(base + k->off));
        } else if (k->type == T_STRLIST) {
            write_strlist(&b, k, r, 2 * depth);
        } else {
            char v[2 * KD_PATH_MAX + 8];
            format_value(r, k, v, sizeof v);
            bprintf(&b, " %s\n", v);
        }
    }
    return b.p;
}

int kd_recipe_write(const kd_recipe_t *r, const char *path, char *err, size_t errlen) {
    char *y = kd_recipe_to_yaml(r);
    int rc = kd_write_file_atomic(path, y, strlen(y), err, errlen);
    free(y);
    return rc;
}

void kd_recipe_data_path(const kd_recipe_t *r, const char *file, char *out, size_t outlen) {
    size_t dl = strlen(r->data.dir);
    if (file[0] == '/' || dl == 0)
        snprintf(out, outlen, "%s", file);
    else
        snprintf(out, outlen, "%s%s%s", r->data.dir, r->data.dir[dl - 1] == '/' ? "" : "/", file);
}

/* ---------------------------------------------------------------------------------------- */
/* Reference                                                                                */

static const char *type_name(const row_t *k) {
    switch (k->type) {
    case T_STR:
        return "string";
    case T_LONG:
    case T_INT:
        return "integer";
    case T_FLOAT:
        return "number";
    case T_BOOL:
        return "bool";
    case T_ENUM:
        return "enum";
    case T_LAYERS:
        return "layer list";
    case T_STRLIST:
        return "string list";
    }
    return "?";
}

static void print_constraint(FILE *out, const row_t *k) {
    char txt[256];
    if (k->type == T_ENUM) {
        enum_choices(k->ops, txt, sizeof txt);
    } else if (k->type == T_LAYERS) {
        snprintf(txt, sizeof txt, "%s, at most %d (see below)",
                 (k->flags & F_REQ) ? "non-empty" : "may be empty", KD_MAX_LAYERS);
    } else if (k->type == T_STRLIST) {
        snprintf(txt, sizeof txt, "at most %.0f entries of %zu bytes", k->max, k->size - 1);
    } else if (k->type == T_STR) {
        snprintf(txt, sizeof txt, "%s%zu bytes at most",
                 k->check == check_name ? "[A-Za-z0-9_.-]+, " : "", k->size - 1);
    } else if (k->type == T_BOOL) {
        snprintf(txt, sizeof txt, "true, false");
    } else {
        range_text(k, txt, sizeof txt);
    }
    fprintf(out, " %s |", txt);
}

static void print_default(FILE *out, const row_t *k) {
    if (k->flags & F_REQ)
        fprintf(out, " *required* |");
    else if (k->flags & F_DEF_KERNEL)
        fprintf(out, " = kernel |");
    else if (k->type == T_STR)
        fprintf(out, " `\"%s\"` |", k->def);
    else
        fprintf(out, " `%s` |", k->def);
}

void kd_recipe_print_reference(FILE *out) {
    fprintf(out, "| key | type | default | range / choices | description |\n");
    fprintf(out, "| --- | --- | --- | --- | --- |\n");
    for (int i = 0; i < N_ROWS; i++) {
        const row_t *k = &schema[i];
        fprintf(out, "| `%s` | %s |", k->key, type_name(k));
        print_default(out, k);
        print_constraint(out, k);
        fprintf(out, " %s |\n", k->desc);
    }
    fprintf(out, "\nLayer list items are mappings with a `type` and the keys of that type:\n\n");
    fprintf(out, "| type | key | type | default | range | description |\n");
    fprintf(out, "| --- | --- | --- | --- | --- | --- |\n");
    for (int kind = 0; kind < KD_LAYER_KIND_COUNT; kind++) {
        bool any = false;
        for (int i = 0; i < N_LAYER_FIELDS; i++) {
            const row_t *f = &layer_fields[i];
            if ((int)f->kind != kind) continue;
            any = true;
            fprintf(out, "| `%s` | `%s` | %s |", layer_ops.name(kind), f->key, type_name(f));
            print_default(out, f);
            print_constraint(out, f);
            fprintf(out, " %s |\n", f->desc);
        }
        if (!any) fprintf(out, "| `%s` | | | | | no other keys |\n", layer_ops.name(kind));
    }
}
