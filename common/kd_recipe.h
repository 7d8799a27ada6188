/* kd_recipe: one YAML file holds every setting of a run (DESIGN §6). Loaded with libyaml into
 * a typed struct, validated against one schema table (name, type, bounds, default), with
 * `section.key=value` overrides, errors as `file:line:col: message` with a did-you-mean, and the
 * resolved recipe written back as YAML. A recipe is plain data (no heap): copy it freely. */
#ifndef KD_RECIPE_H
#define KD_RECIPE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "kd_cache.h"
#include "kd_gpt.h"
#include "kd_loss.h"
#include "kd_model.h"
#include "kd_optim.h"
#include "kd_util.h"

#define KD_NAME_MAX               128
#define KD_MAX_AUTHORIZED_KEYS    64   /* cluster.security.authorized_keys entries */
#define KD_AUTHORIZED_KEY_MAX     512  /* bytes per entry, NUL included */
#define KD_MAX_ROLE_KEYS          16   /* entries of worker_keys, teacher_keys, ... */
#define KD_MAX_DATA_FILES         64   /* data.files entries */
#define KD_EVAL_SAMPLE_MAX_TOKENS 1024 /* eval.sample_tokens */
#define KD_EVAL_PROMPT_MAX        512  /* bytes of eval.sample_prompt, NUL included */

typedef enum { KD_DATA_IMAGES = 0, KD_DATA_TEXT, KD_DATA_TOKENS } kd_data_format_t;

/* cluster.accumulate's bound: the batches one push may carry */
#define KD_MAX_ACCUMULATE 16

typedef enum { KD_CONSISTENCY_SYNC = 0, KD_CONSISTENCY_ASYNC, KD_CONSISTENCY_SSP } kd_consistency_t;
/* how weights and gradients cross TCP (kd_wire.h); the server's master copy stays fp32 */
typedef enum { KD_WIRE_FP32 = 0, KD_WIRE_BF16, KD_WIRE_FP16 } kd_wire_format_t;

typedef struct {
    char name[KD_NAME_MAX]; /* run name: runs/<name>/ */
    long seed;

    struct {
        char dir[KD_PATH_MAX]; /* file names below are relative to dir unless absolute */
        char train_images[KD_PATH_MAX], train_labels[KD_PATH_MAX];
        char test_images[KD_PATH_MAX], test_labels[KD_PATH_MAX];
        long val_size;     /* samples held out of the training file for validation */
        long train_subset; /* use only the first N training samples (0 = all): short runs */
        long test_subset;  /* likewise for the test set */
        /* language-model data (DESIGN §11): a token stream cut into windows of context + 1 */
        kd_data_format_t format;
        int n_files;
        char files[KD_MAX_DATA_FILES][KD_PATH_MAX]; /* text, or token shards */
        char tokenizer[16];                         /* bytes | gpt2 */
        char tokenizer_dir[KD_PATH_MAX];            /* gpt2's files; "" = the installed ones */
        long stride;                                /* tokens between window starts; 0 = context */
        float val_fraction, test_fraction;          /* the stream's tail: validation, then test */
        long val_windows, test_windows;             /* evaluate the first N windows (0 = all) */
    } data;

    struct {
        int n_layers;
        kd_layer_spec_t layers[KD_MAX_LAYERS];
        kd_gpt_config_t gpt; /* gpt.layers > 0: the student is a GPT (layers is empty) */
    } student;

    struct {
        char checkpoint[KD_PATH_MAX]; /* safetensors; empty = none */
        char recipe[KD_PATH_MAX];     /* trains the teacher when checkpoint is missing */
        int n_layers;
        kd_layer_spec_t layers[KD_MAX_LAYERS];
        long batch_size;
        kd_gpt_config_t gpt;     /* gpt.layers > 0: the teacher is a GPT */
        bool drop_vocab_padding; /* a GPT teacher's logits beyond the tokenizer's are dropped */
    } teacher;

    struct {
        kd_loss_config_t loss; /* loss.divergence from `loss`, temperature, alpha */
    } distill;

    struct {
        char dir[KD_PATH_MAX];        /* the teacher-logit cache, shared by teacher nodes */
        kd_cache_encoding_t encoding; /* how logits are stored */
        long topk;                    /* logits kept per sample for the topk encoding */
        long samples;                 /* draws per position for the sampled encoding */
        char import[KD_NAME_MAX];     /* label of imported logits to distil from, or empty */
    } cache;

    struct {
        kd_optim_config_t cfg; /* kind from `name` */
    } optim;

    struct {
        kd_schedule_config_t cfg; /* kind from `name`; lr from optim.lr; total_steps derived */
    } schedule;

    struct {
        long epochs;
        long batch_size;
        long max_steps; /* stop after this many optimizer steps (0 = no limit) */
        long threads;   /* OpenBLAS threads per process (0 = library default) */
    } train;

    struct {
        long every_steps; /* 0 = at the end of each epoch only */
        long batch_size;
        long patience;      /* evaluations without improvement before stopping (0 = never) */
        long sample_tokens; /* language models: text sampled at each evaluation */
        char sample_prompt[KD_EVAL_PROMPT_MAX]; /* what the samples start from ("" = a new document)
                                                 */
    } eval;

    struct {
        long every_steps; /* 0 = only at the end */
        long keep;        /* how many periodic checkpoints to keep */
    } checkpoint;

    struct {
        long workers;
        long teachers;
        long start_workers;  /* the first batches wait for this many workers (0 = no wait) */
        long start_teachers; /* ... and this many teacher nodes (0 = a short gather) */
        kd_consistency_t consistency;
        long staleness; /* ssp bound */
        long heartbeat_ms;
        long heartbeat_timeout_ms;
        long restream_timeout_ms; /* re-request batches streamed but not pushed back after this */
        long stream_hwm;          /* batches queued per teacher->worker pipe (back-pressure) */
        char bind[KD_PATH_MAX];   /* coordinator endpoint; a '*' port picks a free one */
        bool shared_memory;       /* same-host workers skip TCP for tensors (kd_shm.h) */
        kd_wire_format_t wire;    /* weights and gradients over TCP: fp32, bf16 or fp16 */
        long accumulate;          /* batches summed into one push and one update */
        long accumulate_wait_ms;  /* a worker short of `accumulate` batches waits this long */
        bool overlap;             /* chunked pushes, applied and answered chunk by chunk */
        float topk_fraction;      /* > 0: pushes carry this share of the gradient, the rest kept */
        bool restart_failed;      /* kdist run restarts a crashed process (same role, id) */
        float max_gradient_norm;  /* pushes with a larger L2 norm are rejected (0 = no bound) */
        long evict_after;         /* rejected pushes in a row before a member is evicted */
        long fail_after;          /* rejected pushes in a row, cluster-wide, before the run fails */
        long max_nacks;           /* nacks of one batch before the run fails */
        struct {                  /* CurveZMQ (docs/security.md, kd_curve.h) */
            bool curve;           /* every connection encrypted and authenticated */
            bool allow_plaintext; /* non-loopback binds without curve (deliberately insecure) */
            char keys_dir[KD_PATH_MAX];        /* kdist run: `kdist keygen --cluster DIR` */
            char coordinator_key[KD_PATH_MAX]; /* Z85 or a key file; "" = not given */
            int n_authorized_keys;             /* entries: Z85, key file or directory */
            char authorized_keys[KD_MAX_AUTHORIZED_KEYS][KD_AUTHORIZED_KEY_MAX];
            /* keys of one role each (kd_curve_role_t) */
            int n_worker_keys, n_teacher_keys, n_operator_keys, n_status_keys;
            char worker_keys[KD_MAX_ROLE_KEYS][KD_AUTHORIZED_KEY_MAX];
            char teacher_keys[KD_MAX_ROLE_KEYS][KD_AUTHORIZED_KEY_MAX];
            char operator_keys[KD_MAX_ROLE_KEYS][KD_AUTHORIZED_KEY_MAX];
            char status_keys[KD_MAX_ROLE_KEYS][KD_AUTHORIZED_KEY_MAX];
        } security;
    } cluster;

    struct {
        char runs_dir[KD_PATH_MAX];
        long every_steps; /* metrics (TensorBoard, metrics.jsonl) every N optimizer steps */
        char level[16];   /* debug | info | warn | error */
    } logging;
} kd_recipe_t;

/* Defaults for every key (the schema's), with empty layer lists. */
void kd_recipe_defaults(kd_recipe_t *r);

/* Loads path over the defaults, then applies overrides ("section.key=value", n_overrides of
 * them), then validates: unknown keys, wrong types, out-of-range values and missing required
 * keys are errors as "file:line:col: message" (overrides: "override 'k=v': message"), with a
 * "did you mean" for misspelt keys. */
int kd_recipe_load(const char *path, const char *const *overrides, int n_overrides,
                   kd_recipe_t *out, char *err, size_t errlen);
/* The same from an in-memory document; `name` stands for the file in messages. */
int kd_recipe_parse(const char *name, const char *text, size_t len, const char *const *overrides,
                    int n_overrides, kd_recipe_t *out, char *err, size_t errlen);

/* One override "section.key=value" onto a loaded recipe (validated like the file). */
int kd_recipe_set(kd_recipe_t *r, const char *assignment, char *err, size_t errlen);

/* The resolved recipe as YAML that kd_recipe_load reads back to the same struct. Returns a
 * malloc'd string; caller frees. */
char *kd_recipe_to_yaml(const kd_recipe_t *r);
int kd_recipe_write(const kd_recipe_t *r, const char *path, char *err, size_t errlen);

/* What the cluster (coordinator, teacher nodes, workers) runs: a distilling run needs a teacher
 * (teacher.layers, or teacher.gpt for a language model, with teacher.checkpoint) or imported
 * logits. 0, or -1 with err naming the recipe and the fix. */
int kd_recipe_check_cluster(const kd_recipe_t *r, const char *path, char *err, size_t errlen);

/* data.dir joined with a file name (absolute names pass through). */
void kd_recipe_data_path(const kd_recipe_t *r, const char *file, char *out, size_t outlen);

/* The reference of every recipe key (key, type, default, range or choices, description) and of
 * every layer type, as markdown tables generated from the schema (docs/recipe.md). */
void kd_recipe_print_reference(FILE *out);

const char *kd_consistency_name(kd_consistency_t c);
const char *kd_data_format_name(kd_data_format_t f);
int kd_data_format_parse(const char *name, kd_data_format_t *out);
/* Language-model data (text or tokens), whose samples are token windows. */
static inline bool kd_recipe_is_lm(const kd_recipe_t *r) {
    return r->data.format != KD_DATA_IMAGES;
}
int kd_consistency_parse(const char *name, kd_consistency_t *out);
const char *kd_wire_format_name(kd_wire_format_t f);
int kd_wire_format_parse(const char *name, kd_wire_format_t *out);

/* ---- for other YAML readers (cli/kd_inventory.c): the recipe's messages, shared ---------- */

/* " (did you mean 'x'?)" for the candidate nearest to word (at most 2 edits away, else the first
 * one word is a prefix of), or "" when none is near. */
void kd_did_you_mean(const char *word, const char *const *cands, int n, char *out, size_t outlen);

/* An error located in a document: "name:LINE:COL: message", then the source line (cut at 160
 * bytes, control characters shown as '?') and a caret under the column. line and col are
 * 0-based, col in characters as libyaml's marks count them. Returns -1. */
int kd_loc_err(char *err, size_t errlen, const char *name, const char *text, size_t len,
               size_t line, size_t col, const char *fmt, ...) __attribute__((format(printf, 8, 9)));
int kd_loc_verr(char *err, size_t errlen, const char *name, const char *text, size_t len,
                size_t line, size_t col, const char *fmt, va_list ap)
    __attribute__((format(printf, 8, 0)));

/* libyaml's parser ps failed on text: its problem as a kd_loc_err ("invalid YAML: ...").
 * Returns -1. (yaml_parser_t is struct yaml_parser_s; declared here to keep <yaml.h> out.) */
struct yaml_parser_s;
int kd_yaml_syntax_err(const struct yaml_parser_s *ps, const char *name, const char *text,
                       size_t len, char *err, size_t errlen);

#endif
