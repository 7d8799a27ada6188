/* kd_cache: the persistent, shared teacher-logit cache of DESIGN §4. One entry holds the raw
 * logits of one teacher on one dataset in one encoding, in <dir>/<teacher_fp>-<data_fp>/<enc>/
 * (manifest.json + logits.bin: fixed-size records indexed by sample id, grouped in checksummed
 * blocks of consecutive ids). Any number of processes may read and write one entry at once and
 * a crash at any moment leaves it consistent: a torn or corrupted block is reported and then
 * reads as missing, never as data. A handle is not thread-safe (one per thread); the files are
 * shared freely. The on-disk format is described in kd_cache.c. */
#ifndef KD_CACHE_H
#define KD_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kd_data.h"
#include "kd_loss.h"
#include "kd_model.h"

#define KD_CACHE_FP_BYTES           16 /* BLAKE2b-128 */
#define KD_CACHE_FP_HEX             (2 * KD_CACHE_FP_BYTES)
#define KD_CACHE_DESC_MAX           512
#define KD_CACHE_NAME_MAX           (2 * KD_CACHE_FP_HEX + 32) /* "<tfp>-<dfp>/<enc>" */
#define KD_CACHE_DEFAULT_BLOCK_ROWS 256
#define KD_CACHE_MAX_BLOCK_ROWS     (1 << 20)

typedef enum {
    KD_ENC_FP32 = 0, /* exact */
    KD_ENC_FP16,     /* IEEE half, round to nearest even; |x| > 65504 saturates */
    KD_ENC_INT8,     /* per row: centre and scale, then one int8 per class */
    KD_ENC_TOPK,     /* per row: k largest logits (exact) + their classes + lse of the rest */
    KD_ENC_SAMPLED,  /* per row: k classes drawn from softmax(logits / T), sorted (language
                        models: an unbiased sparse target, Anshumann et al. 2025) */
    KD_ENC_COUNT
} kd_cache_encoding_t;

/* Results of kd_cache_get_block; errors are -1. */
enum { KD_CACHE_HIT = 0, KD_CACHE_MISS = 1, KD_CACHE_CORRUPT = 2 };

/* What an entry is for. Fingerprints are lower-case hex (kd_cache_fingerprint_*). */
typedef struct {
    char teacher_fp[KD_CACHE_FP_HEX + 1];
    char data_fp[KD_CACHE_FP_HEX + 1];
    size_t n_samples;
    int n_classes;
    kd_cache_encoding_t encoding;
    int k; /* KD_ENC_TOPK: logits kept per row, 1..n_classes; KD_ENC_SAMPLED: draws
              per row, 1..KD_CACHE_MAX_SAMPLES; otherwise ignored */
    float sample_temperature; /* KD_ENC_SAMPLED: the T of the draws (> 0); otherwise ignored */
    size_t block_rows;        /* samples per block of a new entry (0: default); an existing entry
                                 keeps its own, see kd_cache_block_rows */
    /* Recorded in the manifest for people (kdist cache ls); not part of the key. */
    char teacher_desc[KD_CACHE_DESC_MAX];
    char data_desc[KD_CACHE_DESC_MAX];
} kd_cache_key_t;

typedef struct {
    uint64_t hits, misses, corrupt, puts; /* blocks */
} kd_cache_stats_t;

typedef struct kd_cache kd_cache_t;

#define KD_CACHE_MAX_SAMPLES 1024 /* draws per row of the sampled encoding */

/* "fp32", "fp16", "int8", "topk", "sampled" (defined with the other enum names in kd_names.c). */
const char *kd_cache_encoding_name(kd_cache_encoding_t enc);
/* Exactly one of those names (the recipe's cache.encoding). 0, or -1. */
int kd_cache_encoding_from_name(const char *s, kd_cache_encoding_t *enc);
/* A name, or "topk<k>" / "sampled<k>" (e.g. "topk16"). *k gets the number after the name (0
 * when there is none, and for the dense encodings). 0, or -1. */
int kd_cache_encoding_parse(const char *s, kd_cache_encoding_t *enc, int *k);
/* Bytes of one row's record (see kd_cache.c): what a position costs on disk and on the wire. */
size_t kd_cache_record_bytes(kd_cache_encoding_t enc, int n_classes, int k);

/* Fingerprints, as KD_CACHE_FP_HEX hex digits + NUL. Teacher: the architecture
 * (kd_model_describe) and every parameter byte. Data: shape, class count, pixel bytes, labels
 * and a description of the preprocessing (whatever changes the teacher's inputs, e.g.
 * "pixels/255; split=train val=5000 seed=1"). Import: logits computed elsewhere, named by a
 * user's label; the manifest records the teacher as "import:<label>". */
/* What the teachers' inputs went through, part of the data fingerprint (a change can never be
 * served old logits): pixels as every process scales them; language models' token windows. */
#define KD_CACHE_PREPROCESSING_PIXELS "pixels u8/255"
#define KD_CACHE_PREPROCESSING_TOKENS "token windows"
void kd_cache_fingerprint_teacher(const kd_model_t *teacher, char out[KD_CACHE_FP_HEX + 1]);
void kd_cache_fingerprint_data(const kd_dataset_t *ds, const char *preprocessing,
                               char out[KD_CACHE_FP_HEX + 1]);
void kd_cache_fingerprint_import(const char *label, char out[KD_CACHE_FP_HEX + 1]);

/* Opens the entry of key under dir, creating dir and the entry when missing (race-free: when
 * another process creates it first, its entry is used). An existing entry must agree with the
 * key on every field (errors name the manifest and the field). Caller owns the result; NULL
 * with err set on failure. */
kd_cache_t *kd_cache_open(const char *dir, const kd_cache_key_t *key, char *err, size_t errlen);
/* Opens an existing entry directory (<dir>/<tfp>-<dfp>/<enc>) read-only, key taken from its
 * manifest: for ls, verify and export. */
kd_cache_t *kd_cache_open_entry(const char *entry_dir, char *err, size_t errlen);
void kd_cache_close(kd_cache_t **self_p);

const kd_cache_key_t *kd_cache_key(const kd_cache_t *c); /* block_rows resolved */
const char *kd_cache_dir(const kd_cache_t *c);           /* the entry directory */
const char *kd_cache_name(const kd_cache_t *c);          /* "<tfp>-<dfp>/<enc>" */
bool kd_cache_imported(const kd_cache_t *c);             /* teacher is "import:<label>" */
size_t kd_cache_blocks(const kd_cache_t *c);
size_t kd_cache_block_rows(const kd_cache_t *c);
/* Rows in block b: block_rows, or fewer in the last block. Block b holds samples
 * b * block_rows .. b * block_rows + rows - 1. */
size_t kd_cache_rows_in_block(const kd_cache_t *c, size_t block);
kd_cache_stats_t kd_cache_stats(const kd_cache_t *c);

/* Reads block `block` and decodes it into logits (rows, n_classes). Returns KD_CACHE_HIT;
 * KD_CACHE_MISS when it was never written (logits untouched); KD_CACHE_CORRUPT when it is torn
 * or corrupted (err names the file, the block and the problem; logits untouched: recompute
 * and put it again); -1 on an I/O error or a block out of range.
 * Decoding: fp32 exact; fp16 the half-rounded value; int8 the raw logit within scale/2, where
 * scale = (row max - row min) / 254; topk the k kept logits (the largest exactly, the others as
 * the largest plus their fp16-rounded difference to it) and every other class
 * lse_rest - log(C - k), so the softmax of the row gives the kept classes their original
 * probabilities (within that fp16 rounding) and the others share the rest mass equally (up to
 * the float rounding of that computed logit: a few ulps of the row's magnitude). */
int kd_cache_get_block(kd_cache_t *c, size_t block, float *logits, char *err, size_t errlen);
/* Encodes and writes logits (rows, n_classes) as block `block` with one pwrite. The logits must
 * be finite. Writers of one block must write the same logits (the teacher is deterministic),
 * so concurrent puts are harmless. 0, or -1 with err set. */
int kd_cache_put_block(kd_cache_t *c, size_t block, const float *logits, char *err, size_t errlen);
/* A claim on block `block` across processes and handles, for a writer about to compute it: an
 * advisory lock (released by kd_cache_release_block, by closing the handle or by the process
 * dying) that other claimants see as busy. Readers ignore it. Claim, then get (a hit: someone
 * finished it), else compute, put and release: a block is then computed once. Never waits. */
enum { KD_CACHE_CLAIMED = 1, KD_CACHE_CLAIM_BUSY = 0, KD_CACHE_CLAIM_UNSUPPORTED = -1 };
int kd_cache_claim_block(kd_cache_t *c, size_t block); /* UNSUPPORTED: read-only, no locks */
void kd_cache_release_block(kd_cache_t *c, size_t block);
/* What a put and a get of these logits give back, without a cache: each of rows rows of in
 * (rows, n_classes) encoded and decoded as enc (k for topk) does, into out (may be in). For
 * logits computed outside the cache that must equal the cached ones bit for bit (a teacher
 * serving a row before its block is cached). 0, or -1 with err set (a logit is not finite, or
 * the encoding or k is invalid). */
int kd_cache_roundtrip_rows(kd_cache_encoding_t enc, int k, int n_classes, size_t rows,
                            const float *in, float *out, char *err, size_t errlen);
/* ---- records: rows in their encoding, never decoded to dense rows (big vocabularies) ---- */
/* A record's view is a kd_teacher_row_t (kd_loss.h): dense rows decoded whole; topk its k
 * logits and classes (descending) with the log-sum-exp of the rest; sampled the distinct
 * classes drawn with their counts. */

/* Encodes rows rows of logits (rows, n_classes) into records (rows, kd_cache_record_bytes) as
 * key says; first_row is the global row index of the first one (the sampled draws are keyed by
 * it, so every writer of a row draws the same classes). scratch: NULL, or where the encoder
 * keeps its buffers between calls (start with NULL; free with kd_cache_codec_free). 0, or -1
 * with err set (a logit not finite). */
int kd_cache_encode_records(const kd_cache_key_t *key, size_t first_row, size_t rows,
                            const float *logits, uint8_t *records, void **scratch, char *err,
                            size_t errlen);
void kd_cache_codec_free(void **scratch);
/* The entry's directory name under <teacher_fp>-<data_fp>/: "fp16", "topk16", "sampled12",
 * "sampled12-t2" (drawn at T = 2). */
void kd_cache_entry_subdir(const kd_cache_key_t *key, char *out, size_t outlen);
/* The view of one record: ids (k) and values (max(k, n_classes)) are the caller's buffers the
 * view points into. 0, or -1 when the record cannot be one the encoder wrote (a class out of
 * range, a value not finite, sampled ids not sorted). */
int kd_cache_record_view(const kd_cache_key_t *key, const uint8_t *record, uint32_t *ids,
                         float *values, kd_teacher_row_t *out);
/* Block b's records, checked (checksum, and every record by kd_cache_record_view), into
 * records (rows_in_block, record_bytes). KD_CACHE_HIT / MISS / CORRUPT (records untouched) as
 * kd_cache_get_block, or -1. */
int kd_cache_get_records(kd_cache_t *c, size_t block, uint8_t *records, char *err, size_t errlen);
/* Writes encoded records as block b (one pwrite), as kd_cache_put_block. 0, or -1. */
int kd_cache_put_records(kd_cache_t *c, size_t block, const uint8_t *records, char *err,
                         size_t errlen);

/* fdatasync of the data file: a durability point (a crash loses nothing written before). */
int kd_cache_flush(kd_cache_t *c, char *err, size_t errlen);

/* ---- tools: kdist cache ls | verify | gc | export | import ---------------------------------- */

typedef struct {
    size_t ok, missing, corrupt; /* blocks */
} kd_cache_verify_t;

/* Blocks whose written marker is set (headers only: cheap; verify checks them). */
int kd_cache_coverage(kd_cache_t *c, size_t *written, char *err, size_t errlen);
/* Reads and checks every block. on_bad (may be NULL) gets one message per corrupt block,
 * naming the file and block. 0 when the scan finished (whatever it found), -1 on I/O errors. */
int kd_cache_verify(kd_cache_t *c, kd_cache_verify_t *out,
                    void (*on_bad)(void *user, size_t block, const char *msg), void *user,
                    char *err, size_t errlen);

typedef struct {
    char name[KD_CACHE_NAME_MAX]; /* "<tfp>-<dfp>/<enc>" */
    char path[1024];
    bool ok;            /* manifest and data file readable and consistent */
    char error[512];    /* why not, when !ok */
    kd_cache_key_t key; /* when ok */
    bool imported;
    double created;             /* unix seconds (from the manifest; mtime when !ok) */
    uint64_t bytes, disk_bytes; /* apparent and allocated size of the entry's files */
    size_t blocks, blocks_written;
} kd_cache_entry_info_t;

/* Every entry under dir, sorted by name; broken entries are listed with ok = false. A missing
 * dir is an empty cache. Caller frees *out. */
int kd_cache_list(const char *dir, kd_cache_entry_info_t **out, size_t *n, char *err,
                  size_t errlen);
/* Removes the entries whose name starts with prefix (NULL: all) and, when older_than_days >= 0,
 * were created more than that long ago; also the leftovers of interrupted creations and
 * removals. An entry disappears atomically (renamed away, then deleted), so its readers and
 * writers never see half of it. on_removed (may be NULL) gets each removed name. */
int kd_cache_gc(const char *dir, const char *prefix, double older_than_days,
                void (*on_removed)(void *user, const char *name), void *user, size_t *removed,
                char *err, size_t errlen);
/* Writes the decoded logits as a float32 (n_samples, n_classes) .npy; refuses (naming the
 * first missing or corrupt block) unless every block is present and valid. */
int kd_cache_export_npy(kd_cache_t *c, const char *npy_path, char *err, size_t errlen);
/* Imports a float32 (N, C) .npy as the logits of teacher "import:<label>" on the dataset with
 * fingerprint data_fp, in encoding enc (k for topk; block_rows 0: default). Refuses when that
 * entry already holds logits. name_out (may be NULL) gets the entry name. */
int kd_cache_import_npy(const char *dir, const char *npy_path, const char *data_fp,
                        const char *label, kd_cache_encoding_t enc, int k, size_t block_rows,
                        char *name_out, size_t name_len, char *err, size_t errlen);

/* A language model's logits computed elsewhere (a PyTorch or vLLM teacher on a GPU) for the
 * training windows with fingerprint data_fp, as teacher "import:<label>", one block per
 * window: dense (windows, positions, vocabulary) float32 logits in any encoding (k, and the
 * sampled temperature, as for a teacher node), or top-k pairs: ids (windows, positions, k)
 * int32 or int64 with logprobs of the same shape, float32 log-probabilities (log_softmax at
 * T = 1, as vLLM's logprobs) over a vocabulary of `vocab` ids, as topk<k> (the rest's mass is
 * what they leave). Every value is checked before the entry is created. */
#include "kd_npy.h"
typedef struct {
    const kd_npy_array_t *dense; /* or NULL: the pairs */
    const kd_npy_array_t *ids, *logprobs;
    const char *dense_path, *ids_path, *logprobs_path; /* for messages */
    int vocab;                                         /* the pairs' */
    kd_cache_encoding_t encoding;
    int k;
    float sample_temperature;
    const char *data_fp, *label;
} kd_cache_lm_import_t;
int kd_cache_import_lm(const char *dir, const kd_cache_lm_import_t *in, char *name_out,
                       size_t name_len, char *err, size_t errlen);

#endif
