/* kd_cache: the teacher-logit cache (see kd_cache.h). On-disk format, version 2 for topk
 * entries and 1 for the others (version 2 changed only the topk record: fp16 logits and 16-bit
 * ids, half the bytes, so entries of the other encodings written before stay valid); every
 * integer and float is little-endian:
 *
 *   <dir>/<teacher_fp>-<data_fp>/<enc>/      enc: fp32 | fp16 | int8 | topk<k>
 *       manifest.json   format, version, fingerprints, teacher and data descriptions,
 *                       n_samples, n_classes, encoding, k, block_rows, record_bytes, created
 *       logits.bin      file header (64 bytes), then one block per block_rows sample ids
 *
 *   file header: "KDLOGIT1", u32 version (as the manifest's), u32 encoding, u32 n_classes, u32 k,
 * u32 block_rows, u32 record_bytes, u64 n_samples, u32 block header bytes, u32 0, BLAKE2b-128 of
 * the 48 bytes before it block b at 64 + b * (32 + block_rows * record_bytes), holding rows(b)
 * records: u32 "KDCB" (the written marker), u32 b, u32 rows, u32 record_bytes, BLAKE2b-128 of those
 * 16 bytes and the records, then the records record (one sample, C classes): fp32  f32[C] fp16
 * f16[C] int8  f32 centre, f32 scale, i8[C]: logit = centre + scale * q topk  f32 lse_rest, f32 top
 * (the largest logit), f16 value[j] - top for j = 1..k-1 (descending; fp16 is finest near 0, where
 * the logits that matter are), id class[k] sampled  id class[k] ascending (repeats are counts): k
 * draws from softmax(logits / sample_temperature), keyed by the row's index id: u16 when C <=
 * 65536, else u32 (file header bytes 44..48 hold the sampled encoding's temperature as f32, else 0)
 *
 * The file is created at its full length, so unwritten blocks are holes that read as zeros:
 * a zero header is a miss. A header with a bad marker, a wrong checksum or payload bytes without
 * a header is a torn or corrupted block, reported and then treated as missing.
 *
 * Concurrency: an entry is built in a temporary directory beside it and renamed into place, so
 * it appears whole or not at all; a process that loses that race uses the winner's entry. A
 * block is written with one pwrite; concurrent writers of a block write identical bytes (the
 * teacher and the encoders are deterministic). Readers lock nothing: a reader that catches a
 * block mid-write sees a checksum mismatch and reads again before reporting it. Writers that
 * would compute a block claim it first (kd_cache_claim_block: an OFD lock on the block's first
 * byte), so two teacher nodes filling one cache do not compute the same block; the kernel drops
 * the claim of a process that dies. */
#include "kd_cache.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kd_checkpoint.h"
#include "kd_half.h"
#include "kd_npy.h"
#include "kd_rng.h"
#include "kd_util.h"

#define FORMAT_NAME        "kdist-logit-cache"
#define FORMAT_VERSION     2 /* of topk entries; the others are still written as 1 */
#define MANIFEST_NAME      "manifest.json"
#define DATA_NAME          "logits.bin"
#define FILE_MAGIC         "KDLOGIT1"
#define FILE_HEADER_BYTES  64
#define FILE_HASHED_BYTES  48
#define BLOCK_MAGIC        0x4243444bu /* "KDCB" */
#define BLOCK_HEADER_BYTES 32
#define BLOCK_HASHED_BYTES 16
#define MAX_BLOCK_BYTES    ((size_t)1 << 30)
#define READ_ATTEMPTS      3    /* a block caught mid-write is read again before reporting */
#define CREATE_ATTEMPTS    4    /* a concurrent gc may remove the parent directory under us */
#define STALE_TEMP_SECONDS 3600 /* gc leaves younger temporaries: a creation may be under way */
#define IMPORT_PREFIX      "import:"
#define ENC_DIR_MAX        24 /* "topk" and up to 10 digits */

/* The encoders' scratch, sized for one key (allocated on first use). */
typedef struct {
    float *top_val;    /* (k) topk */
    uint32_t *top_idx; /* (k) */
    uint8_t *in_top;   /* (C) */
    double *cdf;       /* (C) sampled */
    uint32_t *draws;   /* (k) */
} codec_t;

struct kd_cache {
    kd_cache_key_t key;
    char dir[KD_PATH_MAX];
    char data_path[KD_PATH_MAX + 16];
    char manifest_path[KD_PATH_MAX + 16];
    char name[KD_CACHE_NAME_MAX];
    bool imported, writable;
    double created;
    int fd;
    size_t n_blocks, record_bytes, block_stride;
    uint8_t *buf;       /* one block: header + records */
    codec_t codec;      /* for put_block */
    float *scratch;     /* (block_rows, C) for verify and coverage */
    uint32_t *view_ids; /* (k) a record's view (decode_row, get_records) */
    float *view_vals;   /* (max(k, C)) */
    kd_cache_stats_t stats;
};

static void codec_free(codec_t *cd);
static void view_buffers(const kd_cache_key_t *key, uint32_t **ids, float **vals);

/* ---- little-endian fields ------------------------------------------------------------------- */

static void put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_f32(uint8_t *p, float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    put_u32(p, u);
}
static uint16_t get_u16(const uint8_t *p) {
    return (uint16_t)(p[0] | p[1] << 8);
}
static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_u64(const uint8_t *p) {
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}
static float get_f32(const uint8_t *p) {
    uint32_t u = get_u32(p);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- half precision ------------------------------------------------------------------------- */

/* Round to nearest even; finite input (put_block checks); beyond ±65504 saturates. */
static uint16_t f32_to_f16(float f) {
    return kd_f32_to_f16(fminf(fmaxf(f, -65504.0f), 65504.0f));
}

static float f16_to_f32(uint16_t h) {
    return kd_f16_to_f32(h);
}

/* ---- names, keys and fingerprints ----------------------------------------------------------- */

int kd_cache_encoding_parse(const char *s, kd_cache_encoding_t *enc, int *k) {
    if (!s) return -1;
    for (int e = 0; e < KD_ENC_COUNT; e++) {
        const char *name = kd_cache_encoding_name((kd_cache_encoding_t)e);
        size_t n = strlen(name);
        if (strncmp(s, name, n) != 0) continue;
        long v = 0;
        bool counted = e == KD_ENC_TOPK || e == KD_ENC_SAMPLED;
        if (s[n] && (!counted || kd_parse_long(s + n, &v) != 0 || v < 1 || v > INT_MAX)) return -1;
        *enc = (kd_cache_encoding_t)e;
        *k = (int)v;
        return 0;
    }
    return -1;
}

/* The entry's directory name: "fp16", "topk16", "sampled12" (drawn at T = 1), "sampled12-t2". */
static void encoding_dir_name(const kd_cache_key_t *key, char *out, size_t outlen) {
    if (key->encoding == KD_ENC_TOPK)
        snprintf(out, outlen, "topk%d", key->k);
    else if (key->encoding == KD_ENC_SAMPLED && key->sample_temperature == 1.0f)
        snprintf(out, outlen, "sampled%d", key->k);
    else if (key->encoding == KD_ENC_SAMPLED)
        snprintf(out, outlen, "sampled%d-t%g", key->k, (double)key->sample_temperature);
    else
        snprintf(out, outlen, "%s", kd_cache_encoding_name(key->encoding));
}

/* Bytes of a class id in a topk or sampled record. */
static size_t id_bytes(int C) {
    return C <= 65536 ? 2 : 4;
}

/* Class id j of an id array at p (a topk or sampled record's), for C classes. */
static void put_id(uint8_t *p, int C, int j, uint32_t id) {
    if (id_bytes(C) == 2)
        put_u16(p + 2 * (size_t)j, (uint16_t)id);
    else
        put_u32(p + 4 * (size_t)j, id);
}

static uint32_t get_id(const uint8_t *p, int C, int j) {
    return id_bytes(C) == 2 ? get_u16(p + 2 * (size_t)j) : get_u32(p + 4 * (size_t)j);
}

/* The format version an entry of this encoding is written in (see the top of the file). */
static int entry_version(kd_cache_encoding_t enc) {
    return enc == KD_ENC_TOPK ? FORMAT_VERSION : 1;
}

static size_t record_bytes_of(kd_cache_encoding_t enc, int C, int k) {
    switch (enc) {
    case KD_ENC_FP32:
        return 4 * (size_t)C;
    case KD_ENC_FP16:
        return 2 * (size_t)C;
    case KD_ENC_INT8:
        return 8 + (size_t)C;
    case KD_ENC_SAMPLED:
        return (size_t)k * id_bytes(C);
    default:
        return 8 + 2 * (size_t)(k - 1) + (size_t)k * id_bytes(C);
    }
}

size_t kd_cache_record_bytes(kd_cache_encoding_t enc, int C, int k) {
    return record_bytes_of(enc, C, k);
}

static bool is_fp_hex(const char *s) {
    for (int i = 0; i < KD_CACHE_FP_HEX; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
    return s[KD_CACHE_FP_HEX] == 0;
}

static void sodium_ready(void) {
    KD_ASSERT(sodium_init() >= 0);
}

static void hash_start(crypto_generichash_state *st, const char *domain) {
    sodium_ready();
    crypto_generichash_init(st, NULL, 0, KD_CACHE_FP_BYTES);
    crypto_generichash_update(st, (const uint8_t *)domain, strlen(domain) + 1);
}

static void hash_u64(crypto_generichash_state *st, uint64_t v) {
    uint8_t b[8];
    put_u64(b, v);
    crypto_generichash_update(st, b, sizeof b);
}

/* n 32-bit values (floats or ints) in little-endian order whatever the host; chunked to bound
 * the stack. */
static void hash_32bit_array(crypto_generichash_state *st, const void *v, size_t n) {
    const uint8_t *src = v;
    uint8_t chunk[4096];
    for (size_t i = 0; i < n;) {
        size_t m = 0;
        for (; m < sizeof chunk / 4 && i < n; m++, i++) {
            uint32_t u;
            memcpy(&u, src + 4 * i, sizeof u);
            put_u32(chunk + 4 * m, u);
        }
        crypto_generichash_update(st, chunk, 4 * m);
    }
}

static void hash_finish(crypto_generichash_state *st, char out[KD_CACHE_FP_HEX + 1]) {
    uint8_t h[KD_CACHE_FP_BYTES];
    crypto_generichash_final(st, h, sizeof h);
    sodium_bin2hex(out, KD_CACHE_FP_HEX + 1, h, sizeof h);
}

void kd_cache_fingerprint_teacher(const kd_model_t *teacher, char out[KD_CACHE_FP_HEX + 1]) {
    char desc[8192];
    kd_model_describe(teacher, desc, sizeof desc);
    crypto_generichash_state st;
    hash_start(&st, "kdist-teacher-v1");
    crypto_generichash_update(&st, (const uint8_t *)desc, strlen(desc) + 1);
    hash_u64(&st, teacher->n_params);
    _Static_assert(sizeof(float) == 4, "float is not 32-bit");
    hash_32bit_array(&st, teacher->params, teacher->n_params);
    hash_finish(&st, out);
}

void kd_cache_fingerprint_data(const kd_dataset_t *ds, const char *preprocessing,
                               char out[KD_CACHE_FP_HEX + 1]) {
    crypto_generichash_state st;
    if (ds->tokens) { /* windows: the ids, the tokenizer and the windowing decide the logits */
        hash_start(&st, "kdist-tokens-v1");
        crypto_generichash_update(&st, (const uint8_t *)ds->tokenizer_fp,
                                  strlen(ds->tokenizer_fp) + 1);
        hash_u64(&st, ds->n);
        hash_u64(&st, ds->window);
        hash_u64(&st, ds->stride);
        hash_u64(&st, (uint64_t)ds->num_classes);
        hash_32bit_array(&st, (const int32_t *)ds->tokens, ds->n_tokens);
        const char *p = preprocessing ? preprocessing : "";
        crypto_generichash_update(&st, (const uint8_t *)p, strlen(p) + 1);
        hash_finish(&st, out);
        return;
    }
    hash_start(&st, "kdist-data-v1");
    hash_u64(&st, ds->n);
    hash_u64(&st, (uint64_t)ds->channels);
    hash_u64(&st, (uint64_t)ds->height);
    hash_u64(&st, (uint64_t)ds->width);
    hash_u64(&st, (uint64_t)ds->num_classes);
    crypto_generichash_update(&st, ds->pixels, ds->n * ds->sample_dim);
    hash_32bit_array(&st, ds->labels, ds->n);
    const char *pre = preprocessing ? preprocessing : "";
    crypto_generichash_update(&st, (const uint8_t *)pre, strlen(pre) + 1);
    hash_finish(&st, out);
}

void kd_cache_fingerprint_import(const char *label, char out[KD_CACHE_FP_HEX + 1]) {
    crypto_generichash_state st;
    hash_start(&st, "kdist-import-v1");
    crypto_generichash_update(&st, (const uint8_t *)label, strlen(label) + 1);
    hash_finish(&st, out);
}

/* True when desc is "import:<label>" and fp is that label's fingerprint. */
static bool is_import(const char *teacher_fp, const char *desc) {
    if (strncmp(desc, IMPORT_PREFIX, strlen(IMPORT_PREFIX)) != 0) return false;
    char fp[KD_CACHE_FP_HEX + 1];
    kd_cache_fingerprint_import(desc + strlen(IMPORT_PREFIX), fp);
    return strcmp(fp, teacher_fp) == 0;
}

/* Checks a key and fills in its geometry. what names the key's source in messages. */
static int check_key(kd_cache_key_t *key, const char *what, char *err, size_t errlen) {
    if (!is_fp_hex(key->teacher_fp))
        return kd_err(err, errlen, "%s: teacher fingerprint '%.40s' is not %d hex digits", what,
                      key->teacher_fp, KD_CACHE_FP_HEX);
    if (!is_fp_hex(key->data_fp))
        return kd_err(err, errlen, "%s: data fingerprint '%.40s' is not %d hex digits", what,
                      key->data_fp, KD_CACHE_FP_HEX);
    if (key->n_samples == 0) return kd_err(err, errlen, "%s: n_samples must be >= 1", what);
    if (key->n_classes < 1 || key->n_classes > (1 << 26))
        return kd_err(err, errlen, "%s: n_classes %d is out of range 1..%d", what, key->n_classes,
                      1 << 26);
    if ((unsigned)key->encoding >= KD_ENC_COUNT)
        return kd_err(err, errlen, "%s: unknown encoding %d", what, (int)key->encoding);
    if (key->encoding != KD_ENC_TOPK && key->encoding != KD_ENC_SAMPLED) key->k = 0;
    if (key->encoding != KD_ENC_SAMPLED) key->sample_temperature = 0.0f;
    if (key->encoding == KD_ENC_TOPK && (key->k < 1 || key->k > key->n_classes))
        return kd_err(err, errlen, "%s: topk needs k in 1..n_classes (%d), not %d", what,
                      key->n_classes, key->k);
    if (key->encoding == KD_ENC_SAMPLED && (key->k < 1 || key->k > KD_CACHE_MAX_SAMPLES))
        return kd_err(err, errlen, "%s: sampled needs 1..%d draws per row, not %d", what,
                      KD_CACHE_MAX_SAMPLES, key->k);
    if (key->encoding == KD_ENC_SAMPLED &&
        !(key->sample_temperature > 0.0f && key->sample_temperature <= 100.0f))
        return kd_err(err, errlen, "%s: sampled needs a temperature in (0, 100], not %g", what,
                      (double)key->sample_temperature);
    if (key->block_rows == 0) key->block_rows = KD_CACHE_DEFAULT_BLOCK_ROWS;
    if (key->block_rows > KD_CACHE_MAX_BLOCK_ROWS)
        return kd_err(err, errlen, "%s: block_rows %zu is more than %d", what, key->block_rows,
                      KD_CACHE_MAX_BLOCK_ROWS);
    size_t rec = record_bytes_of(key->encoding, key->n_classes, key->k);
    if (BLOCK_HEADER_BYTES + key->block_rows * rec > MAX_BLOCK_BYTES)
        return kd_err(err, errlen, "%s: a block of %zu rows x %zu bytes exceeds %zu bytes", what,
                      key->block_rows, rec, MAX_BLOCK_BYTES);
    if ((key->n_samples - 1) / key->block_rows >= UINT32_MAX)
        return kd_err(err, errlen, "%s: %zu samples make too many blocks of %zu rows", what,
                      key->n_samples, key->block_rows);
    return 0;
}

/* ---- paths and files ------------------------------------------------------------------------ */

static int path_fmt(char *out, size_t outlen, char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int path_fmt(char *out, size_t outlen, char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, outlen, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= outlen) return kd_err(err, errlen, "path too long: %s...", out);
    return 0;
}

static ssize_t pread_full(int fd, uint8_t *buf, size_t len, off_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, buf + done, len - done, off + (off_t)done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        done += (size_t)r;
    }
    return (ssize_t)done;
}

static int pwrite_full(int fd, const uint8_t *buf, size_t len, off_t off) {
    size_t done = 0;
    while (done < len) {
        ssize_t w = pwrite(fd, buf + done, len - done, off + (off_t)done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (w == 0) errno = ENOSPC;
            return -1;
        }
        done += (size_t)w;
    }
    return 0;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

static int remove_tree(const char *path) {
    int rc = nftw(path, remove_one, 8, FTW_DEPTH | FTW_PHYS);
    return rc == 0 || errno == ENOENT ? 0 : -1;
}

static void fsync_dir(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;
    (void)fsync(fd);
    close(fd);
}

/* ---- manifest ------------------------------------------------------------------------------- */

static char *manifest_text(const kd_cache_key_t *key, bool imported) {
    char created[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &tm);
    json_t *j = json_object();
    json_object_set_new(j, "format", json_string(FORMAT_NAME));
    json_object_set_new(j, "version", json_integer(entry_version(key->encoding)));
    json_object_set_new(j, "teacher_fingerprint", json_string(key->teacher_fp));
    json_object_set_new(j, "data_fingerprint", json_string(key->data_fp));
    json_object_set_new(j, "teacher", json_string(key->teacher_desc));
    json_object_set_new(j, "imported", json_boolean(imported));
    json_object_set_new(j, "data", json_string(key->data_desc));
    json_object_set_new(j, "n_samples", json_integer((json_int_t)key->n_samples));
    json_object_set_new(j, "n_classes", json_integer(key->n_classes));
    json_object_set_new(j, "encoding", json_string(kd_cache_encoding_name(key->encoding)));
    json_object_set_new(j, "k", json_integer(key->k));
    if (key->encoding == KD_ENC_SAMPLED)
        json_object_set_new(j, "temperature", json_real(key->sample_temperature));
    json_object_set_new(j, "block_rows", json_integer((json_int_t)key->block_rows));
    json_object_set_new(
        j, "record_bytes",
        json_integer((json_int_t)record_bytes_of(key->encoding, key->n_classes, key->k)));
    json_object_set_new(j, "data_file", json_string(DATA_NAME));
    json_object_set_new(j, "created", json_string(created));
    json_object_set_new(j, "created_unix", json_integer((json_int_t)now));
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(j);
    KD_ASSERT(text);
    return text;
}

static int field_int(const char *path, json_t *root, const char *name, json_int_t lo, json_int_t hi,
                     json_int_t *out, char *err, size_t errlen) {
    json_t *v = json_object_get(root, name);
    if (!v) return kd_err(err, errlen, "%s: field '%s' is missing", path, name);
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return kd_err(err, errlen, "%s: field '%s' must be an integer in %lld..%lld", path, name,
                      (long long)lo, (long long)hi);
    *out = json_integer_value(v);
    return 0;
}

static int field_str(const char *path, json_t *root, const char *name, char *out, size_t outlen,
                     char *err, size_t errlen) {
    json_t *v = json_object_get(root, name);
    if (!v) return kd_err(err, errlen, "%s: field '%s' is missing", path, name);
    if (!json_is_string(v))
        return kd_err(err, errlen, "%s: field '%s' must be a string", path, name);
    if (strlen(json_string_value(v)) >= outlen)
        return kd_err(err, errlen, "%s: field '%s' is longer than %zu characters", path, name,
                      outlen - 1);
    snprintf(out, outlen, "%s", json_string_value(v));
    return 0;
}

static int parse_manifest(const char *path, json_t *root, kd_cache_key_t *key, double *created,
                          char *err, size_t errlen) {
    char text[64];
    json_int_t v = 0;
    if (field_str(path, root, "format", text, sizeof text, err, errlen) != 0) return -1;
    if (strcmp(text, FORMAT_NAME) != 0)
        return kd_err(err, errlen, "%s: field 'format' is '%s', not '%s'", path, text, FORMAT_NAME);
    if (field_int(path, root, "version", 1, FORMAT_VERSION, &v, err, errlen) != 0) return -1;
    const json_int_t version = v;
    if (field_str(path, root, "teacher_fingerprint", key->teacher_fp, sizeof key->teacher_fp, err,
                  errlen) != 0 ||
        field_str(path, root, "data_fingerprint", key->data_fp, sizeof key->data_fp, err, errlen) !=
            0 ||
        field_str(path, root, "teacher", key->teacher_desc, sizeof key->teacher_desc, err,
                  errlen) != 0)
        return -1;
    if (json_object_get(root, "data") &&
        field_str(path, root, "data", key->data_desc, sizeof key->data_desc, err, errlen) != 0)
        return -1;
    if (field_int(path, root, "n_samples", 1, INT64_MAX, &v, err, errlen) != 0) return -1;
    key->n_samples = (size_t)v;
    if (field_int(path, root, "n_classes", 1, 1 << 26, &v, err, errlen) != 0) return -1;
    key->n_classes = (int)v;
    int parsed_k;
    if (field_str(path, root, "encoding", text, sizeof text, err, errlen) != 0) return -1;
    if (kd_cache_encoding_parse(text, &key->encoding, &parsed_k) != 0 || parsed_k != 0)
        return kd_err(err, errlen,
                      "%s: field 'encoding' is '%s', not fp32, fp16, int8, topk or sampled", path,
                      text);
    if (field_int(path, root, "k", 0,
                  key->encoding == KD_ENC_SAMPLED ? KD_CACHE_MAX_SAMPLES : key->n_classes, &v, err,
                  errlen) != 0)
        return -1;
    key->k = (int)v;
    if (version != entry_version(key->encoding))
        return kd_err(err, errlen,
                      "%s: a %s entry in format version %lld, which this kdist does not read (its "
                      "%s entries are version %d: an older kdist wrote this one); remove it "
                      "(kdist cache gc ENTRY) and the next run computes it again",
                      path, text, (long long)version, text, entry_version(key->encoding));
    if (key->encoding == KD_ENC_SAMPLED) {
        json_t *t = json_object_get(root, "temperature");
        if (!json_is_number(t))
            return kd_err(err, errlen, "%s: field 'temperature' must be a number (sampled)", path);
        key->sample_temperature = (float)json_number_value(t);
    }
    if (field_int(path, root, "block_rows", 1, KD_CACHE_MAX_BLOCK_ROWS, &v, err, errlen) != 0)
        return -1;
    key->block_rows = (size_t)v;
    if (check_key(key, path, err, errlen) != 0) return -1;
    size_t rec = record_bytes_of(key->encoding, key->n_classes, key->k);
    if (field_int(path, root, "record_bytes", 1, INT64_MAX, &v, err, errlen) != 0) return -1;
    if ((size_t)v != rec)
        return kd_err(
            err, errlen, "%s: field 'record_bytes' is %lld but %s with %d classes (k %d) needs %zu",
            path, (long long)v, kd_cache_encoding_name(key->encoding), key->n_classes, key->k, rec);
    json_t *c = json_object_get(root, "created_unix");
    *created = json_is_number(c) ? json_number_value(c) : 0.0;
    return 0;
}

static int read_manifest(const char *path, kd_cache_key_t *key, double *created, char *err,
                         size_t errlen) {
    memset(key, 0, sizeof *key);
    if (!kd_file_exists(path))
        return kd_err(err, errlen, "%s: missing (a damaged entry: remove it with kdist cache gc)",
                      path);
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return kd_err(err, errlen, "%s:%d:%d: not valid JSON: %s", path, je.line, je.column,
                      je.text);
    int rc = json_is_object(root) ? parse_manifest(path, root, key, created, err, errlen)
                                  : kd_err(err, errlen, "%s: not a JSON object", path);
    json_decref(root);
    return rc;
}

/* ---- data file header ----------------------------------------------------------------------- */

static void file_header(const kd_cache_key_t *key, uint8_t h[FILE_HEADER_BYTES]) {
    memset(h, 0, FILE_HEADER_BYTES);
    memcpy(h, FILE_MAGIC, 8);
    put_u32(h + 8, (uint32_t)entry_version(key->encoding));
    put_u32(h + 12, (uint32_t)key->encoding);
    put_u32(h + 16, (uint32_t)key->n_classes);
    put_u32(h + 20, (uint32_t)key->k);
    put_u32(h + 24, (uint32_t)key->block_rows);
    put_u32(h + 28, (uint32_t)record_bytes_of(key->encoding, key->n_classes, key->k));
    put_u64(h + 32, key->n_samples);
    put_u32(h + 40, BLOCK_HEADER_BYTES);
    put_f32(h + 44, key->sample_temperature);
    sodium_ready();
    crypto_generichash(h + FILE_HASHED_BYTES, 16, h, FILE_HASHED_BYTES, NULL, 0);
}

/* Compares the data file's header with the one the manifest implies, field by field. */
static int check_file_header(const char *path, const char *manifest, const uint8_t *got,
                             const kd_cache_key_t *key, char *err, size_t errlen) {
    uint8_t want[FILE_HEADER_BYTES], hash[16];
    file_header(key, want);
    if (memcmp(got, FILE_MAGIC, 8) != 0)
        return kd_err(err, errlen, "%s: not a kdist logit file (bad magic)", path);
    crypto_generichash(hash, 16, got, FILE_HASHED_BYTES, NULL, 0);
    if (memcmp(hash, got + FILE_HASHED_BYTES, 16) != 0)
        return kd_err(err, errlen, "%s: file header checksum mismatch (corrupted header)", path);
    static const struct {
        const char *name;
        int off;
    } fields[] = {{"version", 8},    {"encoding", 12},     {"n_classes", 16},
                  {"k", 20},         {"block_rows", 24},   {"record_bytes", 28},
                  {"n_samples", 32}, {"block header", 40}, {"temperature bits", 44}};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        int o = fields[i].off;
        uint64_t g = o == 32 ? get_u64(got + o) : get_u32(got + o);
        uint64_t w = o == 32 ? get_u64(want + o) : get_u32(want + o);
        if (g != w)
            return kd_err(err, errlen, "%s: %s is %llu but %s says %llu", path, fields[i].name,
                          (unsigned long long)g, manifest, (unsigned long long)w);
    }
    return 0;
}

/* ---- opening -------------------------------------------------------------------------------- */

static void geometry(kd_cache_t *c) {
    const kd_cache_key_t *k = &c->key;
    c->record_bytes = record_bytes_of(k->encoding, k->n_classes, k->k);
    c->block_stride = BLOCK_HEADER_BYTES + k->block_rows * c->record_bytes;
    c->n_blocks = (k->n_samples + k->block_rows - 1) / k->block_rows;
}

static off_t block_offset(const kd_cache_t *c, size_t b) {
    return (off_t)(FILE_HEADER_BYTES + b * c->block_stride);
}

static size_t file_length(const kd_cache_t *c) {
    size_t last = kd_cache_rows_in_block(c, c->n_blocks - 1);
    return (size_t)block_offset(c, c->n_blocks - 1) + BLOCK_HEADER_BYTES + last * c->record_bytes;
}

/* The entry's name from its directory path: the last two components. */
static void name_from_dir(const char *dir, char *out, size_t outlen) {
    const char *end = dir + strlen(dir), *p = end;
    int slashes = 0;
    while (p > dir && slashes < 2) {
        p--;
        if (*p == '/') slashes++;
    }
    if (*p == '/') p++;
    snprintf(out, outlen, "%s", p);
}

/* The key a caller asked for must match the entry on disk, field by field. */
static int check_same_key(const kd_cache_t *c, const kd_cache_key_t *want, char *err,
                          size_t errlen) {
    const kd_cache_key_t *got = &c->key;
    const char *m = c->manifest_path;
    /* Same fingerprints but another size: the entry is damaged or the fingerprint misses
     * something that changes the shape. Never serve it. */
    if (got->n_samples != want->n_samples)
        return kd_err(err, errlen, "%s: field 'n_samples' is %zu but %zu were asked for", m,
                      got->n_samples, want->n_samples);
    if (got->n_classes != want->n_classes)
        return kd_err(err, errlen, "%s: field 'n_classes' is %d but %d were asked for", m,
                      got->n_classes, want->n_classes);
    if (got->encoding != want->encoding || got->k != want->k ||
        got->sample_temperature != want->sample_temperature)
        return kd_err(err, errlen, "%s: field 'encoding' is %s (k %d, T %g), not %s (k %d, T %g)",
                      m, kd_cache_encoding_name(got->encoding), got->k,
                      (double)got->sample_temperature, kd_cache_encoding_name(want->encoding),
                      want->k, (double)want->sample_temperature);
    if (strcmp(got->teacher_fp, want->teacher_fp) != 0 || strcmp(got->data_fp, want->data_fp) != 0)
        return kd_err(err, errlen, "%s: fingerprints %s-%s do not match the directory name", m,
                      got->teacher_fp, got->data_fp);
    return 0;
}

static int open_data_file(kd_cache_t *c, char *err, size_t errlen) {
    c->fd = open(c->data_path, (c->writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (c->fd < 0) return kd_err(err, errlen, "%s: cannot open: %s", c->data_path, strerror(errno));
    uint8_t h[FILE_HEADER_BYTES];
    ssize_t n = pread_full(c->fd, h, sizeof h, 0);
    if (n < 0) return kd_err(err, errlen, "%s: read failed: %s", c->data_path, strerror(errno));
    if (n < (ssize_t)sizeof h)
        return kd_err(err, errlen, "%s: %zd bytes, shorter than its %d-byte header", c->data_path,
                      n, FILE_HEADER_BYTES);
    if (check_file_header(c->data_path, c->manifest_path, h, &c->key, err, errlen) != 0) return -1;
    struct stat st;
    if (fstat(c->fd, &st) != 0)
        return kd_err(err, errlen, "%s: stat failed: %s", c->data_path, strerror(errno));
    /* Shorter is allowed (blocks past the end read as missing or torn), longer is not ours. */
    if ((size_t)st.st_size > file_length(c))
        return kd_err(err, errlen, "%s: %lld bytes, more than the %zu the manifest %s implies",
                      c->data_path, (long long)st.st_size, file_length(c), c->manifest_path);
    return 0;
}

/* Opens the entry in entry_dir; when want is given, the entry must be for that key. */
static kd_cache_t *open_dir(const char *entry_dir, const kd_cache_key_t *want, bool writable,
                            char *err, size_t errlen) {
    kd_cache_t *c = kd_xcalloc(1, sizeof *c);
    c->fd = -1;
    c->writable = writable;
    if (path_fmt(c->dir, sizeof c->dir, err, errlen, "%s", entry_dir) != 0) goto fail;
    while (strlen(c->dir) > 1 && c->dir[strlen(c->dir) - 1] == '/') c->dir[strlen(c->dir) - 1] = 0;
    snprintf(c->manifest_path, sizeof c->manifest_path, "%s/%s", c->dir, MANIFEST_NAME);
    snprintf(c->data_path, sizeof c->data_path, "%s/%s", c->dir, DATA_NAME);
    name_from_dir(c->dir, c->name, sizeof c->name);
    if (read_manifest(c->manifest_path, &c->key, &c->created, err, errlen) != 0) goto fail;
    char expect[KD_CACHE_NAME_MAX], sub[ENC_DIR_MAX];
    encoding_dir_name(&c->key, sub, sizeof sub);
    snprintf(expect, sizeof expect, "%s-%s/%s", c->key.teacher_fp, c->key.data_fp, sub);
    if (strcmp(expect, c->name) != 0) {
        kd_err(err, errlen, "%s: describes entry %s but lies in %s", c->manifest_path, expect,
               c->dir);
        goto fail;
    }
    c->imported = is_import(c->key.teacher_fp, c->key.teacher_desc);
    geometry(c);
    if (open_data_file(c, err, errlen) != 0) goto fail;
    if (want && check_same_key(c, want, err, errlen) != 0) goto fail;
    c->buf = kd_xmalloc(c->block_stride);
    view_buffers(&c->key, &c->view_ids, &c->view_vals);
    return c;
fail:
    kd_cache_close(&c);
    return NULL;
}

/* Builds the entry in a temporary directory beside its final place and renames it there: it
 * appears whole or not at all. Returns 0 also when another process got there first. */
static int create_entry(const char *pair, const char *final, const kd_cache_key_t *key,
                        bool imported, char *err, size_t errlen) {
    char tmp[KD_PATH_MAX], path[KD_PATH_MAX + 32], sub[ENC_DIR_MAX];
    encoding_dir_name(key, sub, sizeof sub);
    for (int attempt = 0; attempt < CREATE_ATTEMPTS; attempt++) {
        if (kd_mkdirs(pair, err, errlen) != 0) return -1;
        if (path_fmt(tmp, sizeof tmp, err, errlen, "%s/.tmp-%s-XXXXXX", pair, sub) != 0) return -1;
        if (!mkdtemp(tmp)) {
            if (errno == ENOENT) continue; /* a gc removed pair meanwhile */
            return kd_err(err, errlen, "%s: cannot create a directory: %s", pair, strerror(errno));
        }
        kd_cache_t geo = {.key = *key};
        geometry(&geo);
        uint8_t h[FILE_HEADER_BYTES];
        file_header(key, h);
        snprintf(path, sizeof path, "%s/%s", tmp, DATA_NAME);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        int rc = fd < 0 || pwrite_full(fd, h, sizeof h, 0) != 0 ||
                         ftruncate(fd, (off_t)file_length(&geo)) != 0 || fsync(fd) != 0
                     ? -1
                     : 0;
        if (rc != 0) kd_err(err, errlen, "%s: cannot create: %s", path, strerror(errno));
        if (fd >= 0) close(fd);
        if (rc == 0) {
            char *text = manifest_text(key, imported);
            snprintf(path, sizeof path, "%s/%s", tmp, MANIFEST_NAME);
            rc = kd_write_file_atomic(path, text, strlen(text), err, errlen);
            free(text);
        }
        if (rc == 0 && rename(tmp, final) == 0) {
            fsync_dir(pair);
            return 0;
        }
        int e = errno;
        remove_tree(tmp);
        if (rc != 0) return -1;
        if (e == EEXIST || e == ENOTEMPTY) return 0; /* another writer won: use its entry */
        if (e != ENOENT)
            return kd_err(err, errlen, "%s: cannot rename into place: %s", final, strerror(e));
    }
    return kd_err(err, errlen,
                  "%s: cannot create the entry: its directory keeps disappearing "
                  "(a concurrent kdist cache gc?)",
                  final);
}

kd_cache_t *kd_cache_open(const char *dir, const kd_cache_key_t *key_in, char *err, size_t errlen) {
    KD_ASSERT(dir && key_in);
    kd_cache_key_t key = *key_in;
    if (check_key(&key, dir, err, errlen) != 0) return NULL;
    char pair[KD_PATH_MAX], final[KD_PATH_MAX], sub[ENC_DIR_MAX];
    encoding_dir_name(&key, sub, sizeof sub);
    if (path_fmt(pair, sizeof pair, err, errlen, "%s/%s-%s", dir, key.teacher_fp, key.data_fp) !=
            0 ||
        path_fmt(final, sizeof final, err, errlen, "%s/%s", pair, sub) != 0)
        return NULL;
    struct stat st;
    if (stat(final, &st) != 0 &&
        create_entry(pair, final, &key, is_import(key.teacher_fp, key.teacher_desc), err, errlen) !=
            0)
        return NULL;
    return open_dir(final, &key, true, err, errlen);
}

kd_cache_t *kd_cache_open_entry(const char *entry_dir, char *err, size_t errlen) {
    KD_ASSERT(entry_dir);
    return open_dir(entry_dir, NULL, false, err, errlen);
}

void kd_cache_close(kd_cache_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_cache_t *c = *self_p;
    if (c->fd >= 0) close(c->fd);
    free(c->buf);
    codec_free(&c->codec);
    free(c->scratch);
    free(c->view_ids);
    free(c->view_vals);
    free(c);
    *self_p = NULL;
}

const kd_cache_key_t *kd_cache_key(const kd_cache_t *c) {
    return &c->key;
}
const char *kd_cache_dir(const kd_cache_t *c) {
    return c->dir;
}
const char *kd_cache_name(const kd_cache_t *c) {
    return c->name;
}
bool kd_cache_imported(const kd_cache_t *c) {
    return c->imported;
}
size_t kd_cache_blocks(const kd_cache_t *c) {
    return c->n_blocks;
}
size_t kd_cache_block_rows(const kd_cache_t *c) {
    return c->key.block_rows;
}
size_t kd_cache_rows_in_block(const kd_cache_t *c, size_t block) {
    KD_ASSERT(block < c->n_blocks);
    size_t first = block * c->key.block_rows;
    size_t left = c->key.n_samples - first;
    return left < c->key.block_rows ? left : c->key.block_rows;
}
kd_cache_stats_t kd_cache_stats(const kd_cache_t *c) {
    return c->stats;
}

/* ---- encoders ------------------------------------------------------------------------------- */

static void codec_free(codec_t *cd) {
    free(cd->top_val);
    free(cd->top_idx);
    free(cd->in_top);
    free(cd->cdf);
    free(cd->draws);
    memset(cd, 0, sizeof *cd);
}

static void codec_ready(codec_t *cd, const kd_cache_key_t *key) {
    if (cd->in_top) return;
    size_t C = (size_t)key->n_classes, k = (size_t)key->k + 1;
    cd->in_top = kd_xmalloc(C);
    cd->top_val = kd_xmalloc(k * sizeof *cd->top_val);
    cd->top_idx = kd_xmalloc(k * sizeof *cd->top_idx);
    cd->draws = kd_xmalloc(k * sizeof *cd->draws);
    if (key->encoding == KD_ENC_SAMPLED) cd->cdf = kd_xmalloc(C * sizeof *cd->cdf);
}

static void encode_int8_row(const float *x, int C, uint8_t *rec) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < C; i++) {
        lo = fminf(lo, x[i]);
        hi = fmaxf(hi, x[i]);
    }
    /* Centre and scale from the row's range use all 255 levels; decode gives raw logits. */
    float centre = (float)(0.5 * ((double)hi + (double)lo));
    float scale = (float)(((double)hi - (double)lo) / 254.0);
    put_f32(rec, centre);
    put_f32(rec + 4, scale);
    for (int i = 0; i < C; i++) {
        long q = scale > 0 ? lrint(((double)x[i] - centre) / scale) : 0;
        q = q > 127 ? 127 : q < -127 ? -127 : q;
        rec[8 + i] = (uint8_t)(int8_t)q;
    }
}

/* A topk record of the k kept logits val (descending) of classes idx and the others' lse. */
static void put_topk_record(uint8_t *rec, int C, int k, float rest_lse, const float *val,
                            const uint32_t *idx) {
    put_f32(rec, rest_lse);
    put_f32(rec + 4, val[0]);
    for (int j = 1; j < k; j++) {
        /* below fp16's range the logit's probability is 0 at any temperature anyway */
        float delta = fmaxf(val[j] - val[0], -65504.0f);
        put_u16(rec + 8 + 2 * (size_t)(j - 1), f32_to_f16(delta));
    }
    uint8_t *ids = rec + 8 + 2 * (size_t)(k - 1);
    for (int j = 0; j < k; j++) put_id(ids, C, j, idx[j]);
}

/* The k largest logits, descending, ties to the lower class (deterministic), and the
 * log-sum-exp of the others. */
static void encode_topk_row(codec_t *cd, const kd_cache_key_t *key, const float *x, uint8_t *rec) {
    int C = key->n_classes, k = key->k, n = 0;
    float *val = cd->top_val;
    uint32_t *idx = cd->top_idx;
    for (int i = 0; i < C; i++) {
        if (n == k && !(x[i] > val[k - 1])) continue;
        int j = n < k ? n++ : k - 1;
        for (; j > 0 && val[j - 1] < x[i]; j--) {
            val[j] = val[j - 1];
            idx[j] = idx[j - 1];
        }
        val[j] = x[i];
        idx[j] = (uint32_t)i;
    }
    for (int i = 0; i < C; i++) cd->in_top[i] = 0;
    for (int j = 0; j < k; j++) cd->in_top[idx[j]] = 1;
    double hi = -INFINITY, sum = 0.0;
    for (int i = 0; i < C; i++)
        if (!cd->in_top[i]) hi = fmax(hi, x[i]);
    for (int i = 0; i < C; i++)
        if (!cd->in_top[i]) sum += exp(x[i] - hi);
    put_topk_record(rec, C, k, k < C ? (float)(hi + log(sum)) : -INFINITY, val, idx);
}

static int by_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* k classes drawn with replacement from softmax(x / T), from a generator keyed by the row
 * alone (every writer of the row draws the same), stored sorted. */
static void encode_sampled_row(codec_t *cd, const kd_cache_key_t *key, const float *x, size_t row,
                               uint8_t *rec) {
    const int C = key->n_classes, k = key->k;
    const double inv_t = 1.0 / (double)key->sample_temperature;
    double hi = -INFINITY, sum = 0.0;
    for (int i = 0; i < C; i++) hi = fmax(hi, (double)x[i] * inv_t);
    for (int i = 0; i < C; i++) cd->cdf[i] = sum += exp((double)x[i] * inv_t - hi);
    kd_rng_t rng;
    kd_rng_init(&rng, kd_rng_key(0x6b6473616d706c65ull /* "kdsample" */, row, 0));
    for (int j = 0; j < k; j++) {
        double u = (double)(kd_rng_next(&rng) >> 11) * 0x1.0p-53 * sum;
        int lo = 0, hi_i = C - 1; /* the first class whose cumulative mass exceeds u */
        while (lo < hi_i) {
            int mid = (lo + hi_i) / 2;
            if (cd->cdf[mid] > u)
                hi_i = mid;
            else
                lo = mid + 1;
        }
        cd->draws[j] = (uint32_t)lo;
    }
    qsort(cd->draws, (size_t)k, sizeof *cd->draws, by_u32);
    for (int j = 0; j < k; j++) put_id(rec, C, j, cd->draws[j]);
}

static void encode_row(codec_t *cd, const kd_cache_key_t *key, const float *x, size_t row,
                       uint8_t *rec) {
    int C = key->n_classes;
    codec_ready(cd, key);
    switch (key->encoding) {
    case KD_ENC_FP32:
        for (int i = 0; i < C; i++) put_f32(rec + 4 * i, x[i]);
        break;
    case KD_ENC_FP16:
        for (int i = 0; i < C; i++) put_u16(rec + 2 * i, f32_to_f16(x[i]));
        break;
    case KD_ENC_INT8:
        encode_int8_row(x, C, rec);
        break;
    case KD_ENC_SAMPLED:
        encode_sampled_row(cd, key, x, row, rec);
        break;
    default:
        encode_topk_row(cd, key, x, rec);
    }
}

int kd_cache_record_view(const kd_cache_key_t *key, const uint8_t *rec, uint32_t *ids,
                         float *values, kd_teacher_row_t *out) {
    const int C = key->n_classes, k = key->k;
    *out = (kd_teacher_row_t){.rest_lse = -INFINITY};
    switch (key->encoding) {
    case KD_ENC_FP32:
        for (int i = 0; i < C; i++) values[i] = get_f32(rec + 4 * i);
        break;
    case KD_ENC_FP16:
        for (int i = 0; i < C; i++) values[i] = f16_to_f32(get_u16(rec + 2 * i));
        break;
    case KD_ENC_INT8: {
        float centre = get_f32(rec), scale = get_f32(rec + 4);
        for (int i = 0; i < C; i++) values[i] = centre + scale * (float)(int8_t)rec[8 + i];
        break;
    }
    case KD_ENC_SAMPLED: {
        int n = 0;
        for (int j = 0; j < k; j++) {
            uint32_t id = get_id(rec, C, j);
            if (id >= (uint32_t)C || (n > 0 && id < ids[n - 1])) return -1;
            if (n > 0 && id == ids[n - 1]) {
                values[n - 1] += 1.0f;
                continue;
            }
            ids[n] = id;
            values[n++] = 1.0f;
        }
        *out = (kd_teacher_row_t){n, ids, values, -INFINITY, true};
        return 0;
    }
    default: {
        out->rest_lse = get_f32(rec);
        if (k < C ? !isfinite(out->rest_lse) : out->rest_lse != -INFINITY) return -1;
        const float top = get_f32(rec + 4);
        const uint8_t *id_at = rec + 8 + 2 * (size_t)(k - 1);
        for (int j = 0; j < k; j++) {
            ids[j] = get_id(id_at, C, j);
            float delta = j ? f16_to_f32(get_u16(rec + 8 + 2 * (size_t)(j - 1))) : 0.0f;
            values[j] = top + delta;
            if (ids[j] >= (uint32_t)C || !isfinite(values[j]) || delta > 0.0f) return -1;
            if (j > 0 && values[j] > values[j - 1]) return -1; /* the encoder sorts them */
        }
        out->n = k;
        out->ids = ids;
        out->values = values;
        return 0;
    }
    }
    for (int i = 0; i < C; i++)
        if (!isfinite(values[i])) return -1;
    out->n = C;
    out->values = values;
    return 0;
}

/* A dense row: 0, or -1 when the record cannot be what we wrote. topk: the kept logits and the
 * rest's share; sampled: log of each class's share of the draws (-inf when never drawn). */
static int decode_row(const kd_cache_key_t *key, const uint8_t *rec, float *out, uint32_t *ids,
                      float *vals) {
    const int C = key->n_classes, k = key->k;
    kd_teacher_row_t v;
    if (kd_cache_record_view(key, rec, ids, vals, &v) != 0) return -1;
    if (!v.ids) {
        memcpy(out, vals, (size_t)C * sizeof *out);
        return 0;
    }
    float rest =
        v.sampled || k >= C ? -INFINITY : (float)((double)v.rest_lse - log((double)(C - k)));
    for (int i = 0; i < C; i++) out[i] = rest;
    for (int j = 0; j < v.n; j++)
        out[v.ids[j]] = v.sampled ? (float)log((double)v.values[j] / k) : v.values[j];
    return 0;
}

static void view_buffers(const kd_cache_key_t *key, uint32_t **ids, float **vals) {
    *ids = kd_xmalloc((size_t)(key->k + 1) * sizeof **ids);
    *vals = kd_alloc_floats((size_t)(key->k > key->n_classes ? key->k : key->n_classes));
}

void kd_cache_codec_free(void **scratch) {
    if (!scratch || !*scratch) return;
    codec_free(*scratch);
    free(*scratch);
    *scratch = NULL;
}

void kd_cache_entry_subdir(const kd_cache_key_t *key, char *out, size_t outlen) {
    encoding_dir_name(key, out, outlen);
}

int kd_cache_encode_records(const kd_cache_key_t *key_in, size_t first_row, size_t rows,
                            const float *logits, uint8_t *records, void **scratch, char *err,
                            size_t errlen) {
    kd_cache_key_t key = *key_in;
    if (check_key(&key, "encode", err, errlen) != 0) return -1;
    const size_t C = (size_t)key.n_classes,
                 rb = record_bytes_of(key.encoding, key.n_classes, key.k);
    for (size_t i = 0; i < rows * C; i++)
        if (!isfinite(logits[i]))
            return kd_err(err, errlen, "logit of row %zu class %zu is %g; not encoded",
                          first_row + i / C, i % C, (double)logits[i]);
    codec_t *cd = scratch ? *scratch : NULL;
    if (!cd) cd = kd_xcalloc(1, sizeof *cd);
    for (size_t r = 0; r < rows; r++)
        encode_row(cd, &key, logits + r * C, first_row + r, records + r * rb);
    if (scratch)
        *scratch = cd;
    else {
        codec_free(cd);
        free(cd);
    }
    return 0;
}

/* ---- blocks --------------------------------------------------------------------------------- */

static void block_hash(const uint8_t *block, size_t payload_len, uint8_t out[16]) {
    crypto_generichash_state st;
    crypto_generichash_init(&st, NULL, 0, 16);
    crypto_generichash_update(&st, block, BLOCK_HASHED_BYTES);
    crypto_generichash_update(&st, block + BLOCK_HEADER_BYTES, payload_len);
    crypto_generichash_final(&st, out, 16);
}

static bool all_zero(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return false;
    return true;
}

/* Classifies the block in c->buf (len bytes, read_len of them read from the file). */
static int classify_block(const kd_cache_t *c, size_t b, size_t rows, size_t len, size_t read_len,
                          char *why, size_t whylen) {
    const uint8_t *h = c->buf;
    const char *short_note = read_len < len ? " (the file ends inside this block)" : "";
    if (all_zero(h, BLOCK_HEADER_BYTES)) {
        if (all_zero(h + BLOCK_HEADER_BYTES, len - BLOCK_HEADER_BYTES)) return KD_CACHE_MISS;
        snprintf(why, whylen, "records without a block header (torn write)%s", short_note);
        return KD_CACHE_CORRUPT;
    }
    if (get_u32(h) != BLOCK_MAGIC) {
        snprintf(why, whylen, "bad block marker 0x%08x%s", get_u32(h), short_note);
        return KD_CACHE_CORRUPT;
    }
    if (get_u32(h + 4) != b || get_u32(h + 8) != rows || get_u32(h + 12) != c->record_bytes) {
        snprintf(why, whylen, "header says block %u, %u rows of %u bytes%s", get_u32(h + 4),
                 get_u32(h + 8), get_u32(h + 12), short_note);
        return KD_CACHE_CORRUPT;
    }
    uint8_t hash[16];
    block_hash(h, len - BLOCK_HEADER_BYTES, hash);
    if (memcmp(hash, h + BLOCK_HASHED_BYTES, 16) != 0) {
        snprintf(why, whylen, "checksum mismatch (torn or corrupted write)%s", short_note);
        return KD_CACHE_CORRUPT;
    }
    return KD_CACHE_HIT;
}

static int block_range(const kd_cache_t *c, size_t b, char *err, size_t errlen) {
    if (b < c->n_blocks) return 0;
    return kd_err(err, errlen, "%s: block %zu out of range (the entry has %zu)", c->data_path, b,
                  c->n_blocks);
}

/* Reads block b into c->buf and classifies it; *why says what is wrong when corrupt. */
static int read_block(kd_cache_t *c, size_t b, char *why, size_t whylen, char *err, size_t errlen) {
    size_t rows = kd_cache_rows_in_block(c, b);
    size_t len = BLOCK_HEADER_BYTES + rows * c->record_bytes;
    int st = KD_CACHE_CORRUPT;
    for (int attempt = 0; attempt < READ_ATTEMPTS && st == KD_CACHE_CORRUPT; attempt++) {
        if (attempt) sched_yield(); /* let a writer caught mid-block finish */
        ssize_t n = pread_full(c->fd, c->buf, len, block_offset(c, b));
        if (n < 0)
            return kd_err(err, errlen, "%s: read of block %zu failed: %s", c->data_path, b,
                          strerror(errno));
        memset(c->buf + n, 0, len - (size_t)n);
        st = classify_block(c, b, rows, len, (size_t)n, why, whylen);
    }
    return st;
}

/* Reads block b and checks every record (decoded into c->scratch when decode), counting the
 * outcome. KD_CACHE_HIT / MISS / CORRUPT (err says why), or -1. */
static int read_valid_block(kd_cache_t *c, size_t b, bool decode, char *err, size_t errlen) {
    if (block_range(c, b, err, errlen) != 0) return -1;
    char why[160] = "";
    int st = read_block(c, b, why, sizeof why, err, errlen);
    if (st < 0) return -1;
    const size_t rows = kd_cache_rows_in_block(c, b), C = (size_t)c->key.n_classes;
    if (decode && !c->scratch) c->scratch = kd_alloc_floats(c->key.block_rows * C);
    kd_teacher_row_t v;
    for (size_t r = 0; r < rows && st == KD_CACHE_HIT; r++) {
        const uint8_t *rec = c->buf + BLOCK_HEADER_BYTES + r * c->record_bytes;
        int bad = decode ? decode_row(&c->key, rec, c->scratch + r * C, c->view_ids, c->view_vals)
                         : kd_cache_record_view(&c->key, rec, c->view_ids, c->view_vals, &v);
        if (bad) {
            snprintf(why, sizeof why, "row %zu holds an impossible %s record", r,
                     kd_cache_encoding_name(c->key.encoding));
            st = KD_CACHE_CORRUPT;
        }
    }
    if (st == KD_CACHE_HIT) c->stats.hits++;
    if (st == KD_CACHE_MISS) c->stats.misses++;
    if (st == KD_CACHE_CORRUPT) {
        c->stats.corrupt++;
        size_t first = b * c->key.block_rows;
        kd_err(err, errlen, "%s: block %zu (samples %zu..%zu): %s; treating it as missing",
               c->data_path, b, first, first + rows - 1, why);
    }
    return st;
}

int kd_cache_get_block(kd_cache_t *c, size_t b, float *logits, char *err, size_t errlen) {
    KD_ASSERT(c && logits);
    int st = read_valid_block(c, b, true, err, errlen);
    /* decoded into scratch first, so a bad record leaves the caller's logits untouched */
    if (st == KD_CACHE_HIT)
        memcpy(logits, c->scratch,
               kd_cache_rows_in_block(c, b) * (size_t)c->key.n_classes * sizeof(float));
    return st;
}

int kd_cache_get_records(kd_cache_t *c, size_t b, uint8_t *records, char *err, size_t errlen) {
    KD_ASSERT(c && records);
    int st = read_valid_block(c, b, false, err, errlen);
    if (st == KD_CACHE_HIT)
        memcpy(records, c->buf + BLOCK_HEADER_BYTES,
               kd_cache_rows_in_block(c, b) * c->record_bytes);
    return st;
}

/* Writes the records already in c->buf (after its header room) as block b. */
static int write_block(kd_cache_t *c, size_t b, char *err, size_t errlen) {
    uint8_t *h = c->buf;
    size_t payload = kd_cache_rows_in_block(c, b) * c->record_bytes;
    put_u32(h, BLOCK_MAGIC);
    put_u32(h + 4, (uint32_t)b);
    put_u32(h + 8, (uint32_t)kd_cache_rows_in_block(c, b));
    put_u32(h + 12, (uint32_t)c->record_bytes);
    block_hash(h, payload, h + BLOCK_HASHED_BYTES);
    if (pwrite_full(c->fd, h, BLOCK_HEADER_BYTES + payload, block_offset(c, b)) != 0)
        return kd_err(err, errlen, "%s: write of block %zu failed: %s", c->data_path, b,
                      strerror(errno));
    c->stats.puts++;
    return 0;
}

static int writable_block(const kd_cache_t *c, size_t b, char *err, size_t errlen) {
    if (block_range(c, b, err, errlen) != 0) return -1;
    if (!c->writable) return kd_err(err, errlen, "%s: opened read-only", c->data_path);
    return 0;
}

int kd_cache_put_block(kd_cache_t *c, size_t b, const float *logits, char *err, size_t errlen) {
    KD_ASSERT(c && logits);
    if (writable_block(c, b, err, errlen) != 0) return -1;
    size_t rows = kd_cache_rows_in_block(c, b), C = (size_t)c->key.n_classes;
    for (size_t i = 0; i < rows * C; i++)
        if (!isfinite(logits[i]))
            return kd_err(err, errlen,
                          "%s: block %zu: logit of sample %zu class %zu is %g; not cached",
                          c->data_path, b, b * c->key.block_rows + i / C, i % C, (double)logits[i]);
    for (size_t r = 0; r < rows; r++)
        encode_row(&c->codec, &c->key, logits + r * C, b * c->key.block_rows + r,
                   c->buf + BLOCK_HEADER_BYTES + r * c->record_bytes);
    return write_block(c, b, err, errlen);
}

int kd_cache_put_records(kd_cache_t *c, size_t b, const uint8_t *records, char *err,
                         size_t errlen) {
    KD_ASSERT(c && records);
    if (writable_block(c, b, err, errlen) != 0) return -1;
    size_t rows = kd_cache_rows_in_block(c, b);
    kd_teacher_row_t v;
    for (size_t r = 0; r < rows; r++)
        if (kd_cache_record_view(&c->key, records + r * c->record_bytes, c->view_ids, c->view_vals,
                                 &v) != 0)
            return kd_err(err, errlen,
                          "%s: block %zu: row %zu is not a valid %s record; not cached",
                          c->data_path, b, r, kd_cache_encoding_name(c->key.encoding));
    memcpy(c->buf + BLOCK_HEADER_BYTES, records, rows * c->record_bytes);
    return write_block(c, b, err, errlen);
}

int kd_cache_roundtrip_rows(kd_cache_encoding_t enc, int k, int n_classes, size_t rows,
                            const float *in, float *out, char *err, size_t errlen) {
    KD_ASSERT(in && out);
    /* A handle without files: the encoders need only the key and their scratch. */
    kd_cache_t c = {.key = {.n_samples = 1, .n_classes = n_classes, .encoding = enc, .k = k}};
    snprintf(c.key.teacher_fp, sizeof c.key.teacher_fp, "%0*d", KD_CACHE_FP_HEX, 0);
    snprintf(c.key.data_fp, sizeof c.key.data_fp, "%0*d", KD_CACHE_FP_HEX, 0);
    if (check_key(&c.key, "round trip", err, errlen) != 0) return -1;
    size_t C = (size_t)n_classes;
    for (size_t i = 0; i < rows * C; i++)
        if (!isfinite(in[i]))
            return kd_err(err, errlen, "round trip: logit of row %zu class %zu is %g", i / C, i % C,
                          (double)in[i]);
    c.record_bytes = record_bytes_of(c.key.encoding, n_classes, c.key.k);
    uint8_t *rec = kd_xmalloc(c.record_bytes);
    view_buffers(&c.key, &c.view_ids, &c.view_vals);
    for (size_t r = 0; r < rows; r++) {
        encode_row(&c.codec, &c.key, in + r * C, r, rec);
        /* what we encoded decodes */
        KD_ASSERT(decode_row(&c.key, rec, out + r * C, c.view_ids, c.view_vals) == 0);
    }
    free(rec);
    codec_free(&c.codec);
    free(c.view_ids);
    free(c.view_vals);
    return 0;
}

static int lock_block(kd_cache_t *c, size_t b, short type) {
    struct flock fl = {
        .l_type = type, .l_whence = SEEK_SET, .l_start = block_offset(c, b), .l_len = 1};
    return fcntl(c->fd, F_OFD_SETLK, &fl);
}

int kd_cache_claim_block(kd_cache_t *c, size_t b) {
    KD_ASSERT(c && b < c->n_blocks);
    if (!c->writable) return KD_CACHE_CLAIM_UNSUPPORTED;
    if (lock_block(c, b, F_WRLCK) == 0) return KD_CACHE_CLAIMED;
    return errno == EAGAIN || errno == EACCES ? KD_CACHE_CLAIM_BUSY : KD_CACHE_CLAIM_UNSUPPORTED;
}

void kd_cache_release_block(kd_cache_t *c, size_t b) {
    KD_ASSERT(c && b < c->n_blocks);
    if (c->writable) (void)lock_block(c, b, F_UNLCK);
}

int kd_cache_flush(kd_cache_t *c, char *err, size_t errlen) {
    if (c->writable && fdatasync(c->fd) != 0)
        return kd_err(err, errlen, "%s: fdatasync failed: %s", c->data_path, strerror(errno));
    return 0;
}

/* ---- tools ---------------------------------------------------------------------------------- */

int kd_cache_coverage(kd_cache_t *c, size_t *written, char *err, size_t errlen) {
    *written = 0;
    for (size_t b = 0; b < c->n_blocks; b++) {
        uint8_t marker[4];
        ssize_t n = pread_full(c->fd, marker, sizeof marker, block_offset(c, b));
        if (n < 0)
            return kd_err(err, errlen, "%s: read of block %zu failed: %s", c->data_path, b,
                          strerror(errno));
        if (n == (ssize_t)sizeof marker && get_u32(marker) == BLOCK_MAGIC) ++*written;
    }
    return 0;
}

int kd_cache_verify(kd_cache_t *c, kd_cache_verify_t *out,
                    void (*on_bad)(void *user, size_t block, const char *msg), void *user,
                    char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    float *rows = kd_alloc_floats(c->key.block_rows * (size_t)c->key.n_classes);
    int rc = 0;
    char msg[KD_ERR_LEN];
    for (size_t b = 0; b < c->n_blocks && rc == 0; b++) {
        int st = kd_cache_get_block(c, b, rows, msg, sizeof msg);
        if (st < 0) rc = kd_err(err, errlen, "%s", msg);
        if (st == KD_CACHE_HIT) out->ok++;
        if (st == KD_CACHE_MISS) out->missing++;
        if (st == KD_CACHE_CORRUPT) {
            out->corrupt++;
            if (on_bad) on_bad(user, b, msg);
        }
    }
    free(rows);
    return rc;
}

static void entry_sizes(const char *dir, uint64_t *bytes, uint64_t *disk) {
    *bytes = *disk = 0;
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char path[KD_PATH_MAX + 300];
    while ((e = readdir(d))) {
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (e->d_name[0] == '.' || stat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        *bytes += (uint64_t)st.st_size;
        *disk += (uint64_t)st.st_blocks * 512;
    }
    closedir(d);
}

static void entry_info(const char *dir, const char *pair, const char *sub,
                       kd_cache_entry_info_t *info) {
    memset(info, 0, sizeof *info);
    int name_len = snprintf(info->name, sizeof info->name, "%s/%s", pair, sub),
        path_len = snprintf(info->path, sizeof info->path, "%s/%s/%s", dir, pair, sub);
    if (name_len >= (int)sizeof info->name || path_len >= (int)sizeof info->path) {
        snprintf(info->error, sizeof info->error, "%s/%.64s...: not an entry (name too long)", pair,
                 sub);
        return;
    }
    entry_sizes(info->path, &info->bytes, &info->disk_bytes);
    struct stat st;
    if (stat(info->path, &st) == 0) info->created = (double)st.st_mtime;
    kd_cache_t *c = kd_cache_open_entry(info->path, info->error, sizeof info->error);
    if (!c) return;
    info->key = c->key;
    info->imported = c->imported;
    if (c->created > 0) info->created = c->created;
    info->blocks = c->n_blocks;
    info->ok = kd_cache_coverage(c, &info->blocks_written, info->error, sizeof info->error) == 0;
    kd_cache_close(&c);
}

static bool is_pair_name(const char *s) {
    char t[KD_CACHE_FP_HEX + 1];
    if (strlen(s) != 2 * KD_CACHE_FP_HEX + 1 || s[KD_CACHE_FP_HEX] != '-') return false;
    memcpy(t, s, KD_CACHE_FP_HEX);
    t[KD_CACHE_FP_HEX] = 0;
    return is_fp_hex(t) && is_fp_hex(s + KD_CACHE_FP_HEX + 1);
}

static int by_name(const void *a, const void *b) {
    return strcmp(((const kd_cache_entry_info_t *)a)->name,
                  ((const kd_cache_entry_info_t *)b)->name);
}

/* Appends the entries of one <tfp>-<dfp> directory. */
static void list_pair(const char *dir, const char *pair, kd_cache_entry_info_t **out, size_t *n,
                      size_t *cap) {
    char path[KD_PATH_MAX + 80];
    snprintf(path, sizeof path, "%s/%s", dir, pair);
    DIR *d = opendir(path);
    if (!d) return; /* removed meanwhile */
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || strlen(e->d_name) > 24) continue; /* temporaries, strays */
        if (*n == *cap) {
            *cap = *cap ? 2 * *cap : 16;
            *out = realloc(*out, *cap * sizeof **out);
            KD_ASSERT(*out);
        }
        entry_info(dir, pair, e->d_name, &(*out)[(*n)++]);
    }
    closedir(d);
}

int kd_cache_list(const char *dir, kd_cache_entry_info_t **out, size_t *n, char *err,
                  size_t errlen) {
    *out = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) {
        if (errno == ENOENT) return 0;
        return kd_err(err, errlen, "%s: cannot read the cache directory: %s", dir, strerror(errno));
    }
    size_t cap = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (is_pair_name(e->d_name)) list_pair(dir, e->d_name, out, n, &cap);
    closedir(d);
    if (*n) qsort(*out, *n, sizeof **out, by_name);
    return 0;
}

/* Renames the entry away (atomic for its users), then deletes it. 1 when someone else removed
 * it first. */
static int remove_entry(const char *dir, const char *name, char *err, size_t errlen) {
    static _Atomic unsigned long counter = 0;
    char src[KD_PATH_MAX], trash[KD_PATH_MAX], pair[KD_PATH_MAX];
    if (path_fmt(src, sizeof src, err, errlen, "%s/%s", dir, name) != 0) return -1;
    snprintf(pair, sizeof pair, "%s", src);
    *strrchr(pair, '/') = 0;
    if (path_fmt(trash, sizeof trash, err, errlen, "%s/.trash-%ld-%lu", pair, (long)getpid(),
                 counter++) != 0)
        return -1;
    if (rename(src, trash) != 0) {
        if (errno == ENOENT) return 1;
        return kd_err(err, errlen, "%s: cannot remove: %s", src, strerror(errno));
    }
    fsync_dir(pair);
    if (remove_tree(trash) != 0)
        return kd_err(err, errlen, "%s: cannot delete: %s", trash, strerror(errno));
    (void)rmdir(pair); /* only when empty */
    return 0;
}

/* Leftovers of crashed creations (older than STALE_TEMP_SECONDS) and removals. */
static void sweep_pair(const char *dir, const char *pair, double now) {
    char path[KD_PATH_MAX + 80], sub[KD_PATH_MAX + 400];
    snprintf(path, sizeof path, "%s/%s", dir, pair);
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        bool tmp = strncmp(e->d_name, ".tmp-", 5) == 0,
             trash = strncmp(e->d_name, ".trash-", 7) == 0;
        struct stat st;
        snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
        if ((!tmp && !trash) || stat(sub, &st) != 0) continue;
        if (trash || now - (double)st.st_mtime > STALE_TEMP_SECONDS) remove_tree(sub);
    }
    closedir(d);
    (void)rmdir(path);
}

int kd_cache_gc(const char *dir, const char *prefix, double older_than_days,
                void (*on_removed)(void *user, const char *name), void *user, size_t *removed,
                char *err, size_t errlen) {
    kd_cache_entry_info_t *list;
    size_t n;
    *removed = 0;
    if (kd_cache_list(dir, &list, &n, err, errlen) != 0) return -1;
    double now = kd_wall_time();
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        if (prefix && strncmp(list[i].name, prefix, strlen(prefix)) != 0) continue;
        if (older_than_days >= 0 && now - list[i].created < older_than_days * 86400.0) continue;
        int r = remove_entry(dir, list[i].name, err, errlen);
        if (r < 0) rc = -1;
        if (r == 0) {
            ++*removed;
            if (on_removed) on_removed(user, list[i].name);
        }
    }
    free(list);
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (is_pair_name(e->d_name)) sweep_pair(dir, e->d_name, now);
    if (d) closedir(d);
    return rc;
}

int kd_cache_export_npy(kd_cache_t *c, const char *npy_path, char *err, size_t errlen) {
    size_t C = (size_t)c->key.n_classes, N = c->key.n_samples;
    if (N > SIZE_MAX / sizeof(float) / C)
        return kd_err(err, errlen, "%s: %zu x %zu logits do not fit in memory", c->dir, N, C);
    float *all = kd_alloc_floats(N * C);
    size_t missing = 0, corrupt = 0, first_bad = SIZE_MAX;
    char msg[KD_ERR_LEN];
    int rc = 0;
    for (size_t b = 0; b < c->n_blocks && rc == 0; b++) {
        int st = kd_cache_get_block(c, b, all + b * c->key.block_rows * C, msg, sizeof msg);
        if (st < 0) rc = kd_err(err, errlen, "%s", msg);
        if (st == KD_CACHE_MISS || st == KD_CACHE_CORRUPT) {
            if (first_bad == SIZE_MAX) first_bad = b;
            if (st == KD_CACHE_MISS)
                missing++;
            else
                corrupt++;
        }
    }
    if (rc == 0 && first_bad != SIZE_MAX) {
        size_t lo = first_bad * c->key.block_rows;
        rc = kd_err(err, errlen,
                    "%s: incomplete, not exported: %zu of %zu blocks missing, %zu corrupt (first: "
                    "block %zu, samples %zu..%zu); let a teacher node fill it first",
                    c->name, missing, c->n_blocks, corrupt, first_bad, lo,
                    lo + kd_cache_rows_in_block(c, first_bad) - 1);
    }
    if (rc == 0) rc = kd_npy_write_f32(npy_path, all, N, C, err, errlen);
    free(all);
    return rc;
}

static int check_label(const char *label, char *err, size_t errlen) {
    size_t n = strlen(label);
    if (n == 0 || n > 200)
        return kd_err(err, errlen, "label must have 1 to 200 characters, not %zu", n);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)label[i] < 0x20 || label[i] == 0x7f)
            return kd_err(err, errlen, "label '%s' has a control character", label);
    return 0;
}

/* The names an import is filed under, checked before any file is read. */
static int check_import_names(const char *data_fp, const char *label, char *err, size_t errlen) {
    if (check_label(label, err, errlen) != 0) return -1;
    if (strlen(data_fp) != KD_CACHE_FP_HEX || !is_fp_hex(data_fp))
        return kd_err(err, errlen, "data fingerprint '%s' is not %d lower-case hex digits", data_fp,
                      KD_CACHE_FP_HEX);
    return 0;
}

/* An import's key (label, data fingerprint) and its entry, opened empty: 0, or -1. */
static int open_import(const char *dir, kd_cache_key_t *key, const char *data_fp, const char *label,
                       const char *source, kd_cache_t **out, char *err, size_t errlen) {
    *out = NULL;
    if (check_import_names(data_fp, label, err, errlen) != 0) return -1;
    kd_cache_fingerprint_import(label, key->teacher_fp);
    snprintf(key->data_fp, sizeof key->data_fp, "%s", data_fp);
    snprintf(key->teacher_desc, sizeof key->teacher_desc, "%s%s", IMPORT_PREFIX, label);
    snprintf(key->data_desc, sizeof key->data_desc, "imported from %.400s", source);
    kd_cache_t *c = kd_cache_open(dir, key, err, errlen);
    size_t written = 0;
    if (!c || kd_cache_coverage(c, &written, err, errlen) != 0) {
        kd_cache_close(&c);
        return -1;
    }
    if (written) {
        kd_err(err, errlen,
               "%s: already holds %zu blocks imported as '%s'; remove it first (kdist cache gc "
               "%s)",
               c->dir, written, label, c->name);
        kd_cache_close(&c);
        return -1;
    }
    *out = c;
    return 0;
}

static int finish_import(kd_cache_t *c, char *name_out, size_t name_len, char *err, size_t errlen) {
    if (kd_cache_flush(c, err, errlen) != 0) return -1;
    if (name_out) snprintf(name_out, name_len, "%s", c->name);
    return 0;
}

int kd_cache_import_npy(const char *dir, const char *npy_path, const char *data_fp,
                        const char *label, kd_cache_encoding_t enc, int k, size_t block_rows,
                        char *name_out, size_t name_len, char *err, size_t errlen) {
    float *logits = NULL;
    size_t rows, cols;
    if (check_import_names(data_fp, label, err, errlen) != 0 ||
        kd_npy_read_f32(npy_path, &logits, &rows, &cols, err, errlen) != 0)
        return -1;
    kd_cache_key_t key = {.n_samples = rows, .encoding = enc, .k = k, .block_rows = block_rows};
    key.n_classes = cols > (1 << 26) ? 0 : (int)cols;
    kd_cache_t *c = NULL;
    int rc = -1;
    if (rows == 0 || key.n_classes == 0) {
        kd_err(err, errlen, "%s: shape (%zu, %zu) is not (samples, classes) logits", npy_path, rows,
               cols);
        goto out;
    }
    /* Checked up front so a bad file leaves no half-imported entry behind. */
    for (size_t i = 0; i < rows * cols; i++)
        if (!isfinite(logits[i])) {
            kd_err(err, errlen, "%s: row %zu column %zu is %g; logits must be finite", npy_path,
                   i / cols, i % cols, (double)logits[i]);
            goto out;
        }
    if (open_import(dir, &key, data_fp, label, npy_path, &c, err, errlen) != 0) goto out;
    size_t C = (size_t)key.n_classes;
    for (size_t b = 0; b < c->n_blocks; b++)
        if (kd_cache_put_block(c, b, logits + b * c->key.block_rows * C, err, errlen) != 0)
            goto out;
    rc = finish_import(c, name_out, name_len, err, errlen);
out:
    kd_cache_close(&c);
    free(logits);
    return rc;
}

/* One position's top-k record from k (id, log-probability) pairs: sorted descending (ties to
 * the lower id), the rest's mass 1 - sum p as its log-sum-exp (log-probabilities are logits
 * whose log-sum-exp is 0). 0, or -1 with why set. */
static int topk_record_from_pairs(const int64_t *ids, const float *lp, int k, int C, uint8_t *rec,
                                  uint32_t *idx, float *val, char *why, size_t whylen) {
    double mass = 0.0;
    for (int j = 0; j < k; j++) {
        if (ids[j] < 0 || ids[j] >= C)
            return kd_err(why, whylen, "id %lld is outside the vocabulary [0, %d)",
                          (long long)ids[j], C);
        if (!isfinite(lp[j]) || lp[j] > 1e-4f)
            return kd_err(why, whylen,
                          "value %g is not a log-probability (finite and <= 0: log_softmax)",
                          (double)lp[j]);
        mass += exp((double)lp[j]);
        int n = j; /* insertion: descending value, ties to the lower id */
        while (n > 0 && (val[n - 1] < lp[j] || (val[n - 1] == lp[j] && idx[n - 1] > ids[j]))) {
            val[n] = val[n - 1];
            idx[n] = idx[n - 1];
            n--;
        }
        val[n] = lp[j];
        idx[n] = (uint32_t)ids[j];
    }
    for (int j = 1; j < k; j++)
        for (int i = 0; i < j; i++)
            if (idx[i] == idx[j]) return kd_err(why, whylen, "id %u appears twice", idx[j]);
    if (mass > 1.0 + 1e-3)
        return kd_err(why, whylen,
                      "its probabilities sum to %.4f > 1: the values must be log-probabilities "
                      "(log_softmax of the logits), not raw logits",
                      mass);
    /* what is left for the others; never exactly 0, so the rest stays a bucket */
    put_topk_record(rec, C, k, k < C ? (float)log(fmax(1.0 - mass, 1e-30)) : -INFINITY, val, idx);
    return 0;
}

int kd_cache_import_lm(const char *dir, const kd_cache_lm_import_t *in, char *name_out,
                       size_t name_len, char *err, size_t errlen) {
    const kd_npy_array_t *dense = in->dense, *ids = in->ids, *lp = in->logprobs;
    const bool pairs = dense == NULL;
    if (check_import_names(in->data_fp, in->label, err, errlen) != 0) return -1;
    const kd_npy_array_t *shape = pairs ? ids : dense;
    if (!shape || shape->ndim != 3 || shape->shape[0] == 0 || shape->shape[1] == 0 ||
        shape->shape[2] == 0)
        return kd_err(err, errlen, "%s: expected a 3-D array (windows, positions, %s)",
                      pairs ? in->ids_path : in->dense_path, pairs ? "k" : "vocabulary");
    const size_t N = shape->shape[0], T = shape->shape[1], K = shape->shape[2];
    if (pairs &&
        (!lp || lp->ndim != 3 || lp->shape[0] != N || lp->shape[1] != T || lp->shape[2] != K))
        return kd_err(err, errlen, "%s and %s: the ids and values must have the same shape",
                      in->ids_path, in->logprobs_path);
    const int C = pairs ? in->vocab : (int)(K > (1 << 26) ? 0 : K);
    if (C < 1 || (pairs && K > (size_t)C))
        return kd_err(err, errlen, "%s",
                      pairs ? "--vocab must be at least k (the pairs' last "
                              "dimension)"
                            : "the vocabulary is out of range");
    kd_cache_key_t key = {.n_samples = N * T,
                          .n_classes = C,
                          .encoding = pairs ? KD_ENC_TOPK : in->encoding,
                          .k = pairs ? (int)K : in->k,
                          .sample_temperature = in->sample_temperature,
                          .block_rows = T};
    if (pairs && in->encoding != KD_ENC_TOPK)
        return kd_err(err, errlen, "top-k pairs import as --encoding topk (topk%zu), not %s", K,
                      kd_cache_encoding_name(in->encoding));
    if (pairs && in->k && (size_t)in->k != K)
        return kd_err(err, errlen, "--encoding topk%d but %s holds %zu per position", in->k,
                      in->ids_path, K);
    kd_cache_t *c = NULL;
    const char *source = pairs ? in->ids_path : in->dense_path;
    const size_t rb = record_bytes_of(key.encoding, C, key.k);
    uint8_t *records = kd_xmalloc(T * rb);
    int64_t *row_ids = kd_xmalloc(K * sizeof *row_ids);
    uint32_t *idx = kd_xmalloc((K + 1) * sizeof *idx);
    float *val = kd_alloc_floats(K + 1);
    void *codec = NULL;
    int rc = -1;
    /* every value checked before the entry exists: a bad file leaves nothing behind */
    for (size_t i = 0; !pairs && i < dense->count; i++)
        if (!isfinite(((const float *)dense->data)[i])) {
            kd_err(err, errlen, "%s: window %zu position %zu id %zu is %g; logits must be finite",
                   in->dense_path, i / (T * K), i / K % T, i % K,
                   (double)((const float *)dense->data)[i]);
            goto out;
        }
    /* pairs: a checking pass over every window first; dense rows were checked above */
    for (int pass = pairs ? 0 : 1; pass < 2; pass++) {
        if (pass == 1 &&
            open_import(dir, &key, in->data_fp, in->label, source, &c, err, errlen) != 0)
            goto out;
        for (size_t v = 0; v < N; v++) {
            for (size_t t = 0; t < T; t++) {
                const size_t at = (v * T + t) * K;
                char why[256];
                if (!pairs) {
                    if (kd_cache_encode_records(&key, v * T + t, 1, (const float *)dense->data + at,
                                                records + t * rb, &codec, err, errlen) != 0)
                        goto out;
                    continue;
                }
                for (size_t j = 0; j < K; j++)
                    row_ids[j] = ids->dtype == KD_NPY_I64 ? ((const int64_t *)ids->data)[at + j]
                                                          : ((const int32_t *)ids->data)[at + j];
                if (topk_record_from_pairs(row_ids, (const float *)lp->data + at, (int)K, C,
                                           records + t * rb, idx, val, why, sizeof why) != 0) {
                    kd_err(err, errlen, "%s / %s: window %zu position %zu: %s", in->ids_path,
                           in->logprobs_path, v, t, why);
                    goto out;
                }
            }
            if (pass == 1 && kd_cache_put_records(c, v, records, err, errlen) != 0) goto out;
        }
    }
    rc = finish_import(c, name_out, name_len, err, errlen);
out:
    kd_cache_codec_free(&codec);
    kd_cache_close(&c);
    free(records);
    free(row_ids);
    free(idx);
    free(val);
    return rc;
}
