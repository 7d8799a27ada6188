/* checkpoint: the coordinator's resumable state in one safetensors file — the student's
 * parameters under PyTorch names (so a checkpoint also loads into PyTorch), the optimizer
 * moments, the current epoch's ledger, and the counters as JSON metadata. Written atomically,
 * then its BLAKE2b digest next to it (<file>.blake2b); on resume a checkpoint whose bytes do not
 * match its digest (damaged on disk, or cut short before the digest was written) is reported
 * and skipped, like a torn or foreign file. */
#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <jansson.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoint.h"
#include "kd_checkpoint.h"
#include "kd_log.h"

#define DIGEST_SUFFIX  ".blake2b"
#define PARTIAL_SUFFIX ".partial"

/* The hex BLAKE2b-256 of a file's bytes into hex (65 bytes). */
static int file_digest(const char *path, char *hex, char *err, size_t errlen) {
    uint8_t *data = NULL, digest[crypto_generichash_BYTES];
    size_t len = 0;
    if (kd_read_file(path, &data, &len, err, errlen) != 0) return -1;
    crypto_generichash(digest, sizeof digest, data, len, NULL, 0);
    free(data);
    sodium_bin2hex(hex, 2 * sizeof digest + 1, digest, sizeof digest);
    return 0;
}

/* The digest of the bytes at path, as the digest of the checkpoint named final. */
static int write_digest(const char *path, const char *final, char *err, size_t errlen) {
    char hex[2 * crypto_generichash_BYTES + 1], digest_path[KD_PATH_MAX + 400];
    if (file_digest(path, hex, err, errlen) != 0) return -1;
    snprintf(digest_path, sizeof digest_path, "%s" DIGEST_SUFFIX, final);
    return kd_write_file_atomic(digest_path, hex, strlen(hex), err, errlen);
}

static int check_digest(const char *path, char *err, size_t errlen) {
    char hex[2 * crypto_generichash_BYTES + 1], digest_path[KD_PATH_MAX + 400];
    snprintf(digest_path, sizeof digest_path, "%s" DIGEST_SUFFIX, path);
    uint8_t *want = NULL;
    size_t len = 0;
    if (kd_read_file(digest_path, &want, &len, err, errlen) != 0)
        return kd_err(err, errlen, "%s has no digest %s (cut short before it was written?)", path,
                      digest_path);
    int rc = file_digest(path, hex, err, errlen);
    if (rc == 0 && (len != strlen(hex) || memcmp(want, hex, len) != 0))
        rc = kd_err(err, errlen, "%s does not match its digest %s: the file is damaged", path,
                    digest_path);
    free(want);
    return rc;
}

/* A checkpoint file's name: ckpt-<step>-<seq>.safetensors (seq tells apart saves at one step;
 * ckpt-<step>.safetensors from older versions reads as seq 0). */
typedef struct {
    long step;
    int seq;
    char name[256];
} ckpt_name_t;

static bool parse_ckpt_name(const char *name, ckpt_name_t *out) {
    const char *suffix = ".safetensors";
    size_t n = strlen(name), k = strlen(suffix);
    if (strncmp(name, "ckpt-", 5) != 0 || n <= k || n >= sizeof out->name ||
        strcmp(name + n - k, suffix) != 0 || strstr(name, ".tmp."))
        return false;
    char tail[16];
    long step;
    int seq = 0, used = 0;
    if (sscanf(name, "ckpt-%ld%n", &step, &used) != 1 || step < 0) return false;
    bool with_seq = name[used] == '-' && sscanf(name + used, "-%d%15s", &seq, tail) == 2 &&
                    seq >= 0 && strcmp(tail, suffix) == 0;
    if (!with_seq && strcmp(name + used, suffix) != 0) return false;
    out->step = step;
    out->seq = seq;
    snprintf(out->name, sizeof out->name, "%s", name);
    return true;
}

static int newest_first(const void *a, const void *b) {
    const ckpt_name_t *x = a, *y = b;
    if (x->step != y->step) return x->step < y->step ? 1 : -1;
    return x->seq < y->seq ? 1 : x->seq > y->seq ? -1 : 0;
}

/* The checkpoint files of dir, newest first (caller frees *out); their count, -1 if dir cannot
 * be read. */
static int list_checkpoints(const char *dir, ckpt_name_t **out) {
    *out = NULL;
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        ckpt_name_t c;
        if (!parse_ckpt_name(e->d_name, &c)) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            *out = realloc(*out, (size_t)cap * sizeof **out);
            KD_ASSERT(*out);
        }
        (*out)[n++] = c;
    }
    closedir(d);
    if (n) qsort(*out, (size_t)n, sizeof **out, newest_first);
    return n;
}

int coord_checkpoint_count(const char *dir) {
    ckpt_name_t *list;
    int n = list_checkpoints(dir, &list);
    free(list);
    return n < 0 ? 0 : n;
}

int coord_checkpoint_save(const char *dir, const coord_state_t *s, const kd_model_t *m,
                          const kd_optim_t *opt, const uint8_t *applied, size_t n_batches,
                          long keep, char *err, size_t errlen) {
    /* a new name every time: a checkpoint is never overwritten in place, so a crash between the
     * file and its digest can only spoil the new one */
    char path[KD_PATH_MAX + 64];
    for (int seq = 0;; seq++) {
        snprintf(path, sizeof path, "%s/ckpt-%09ld-%03d.safetensors", dir, s->step, seq);
        if (!kd_file_exists(path)) break;
    }
    if (kd_checkpoint_check_finite(m, path, err, errlen) != 0) return -1;
    kd_st_writer_t *w = kd_st_writer_new();
    kd_checkpoint_add_model(w, m);
    int64_t n = (int64_t)opt->n, nb = (int64_t)n_batches;
    kd_st_writer_add(w, "optim.m", KD_DTYPE_F32, 1, &n, opt->m);
    if (opt->v) kd_st_writer_add(w, "optim.v", KD_DTYPE_F32, 1, &n, opt->v);
    kd_st_writer_add(w, "ledger.applied", KD_DTYPE_U8, 1, &nb, applied);
    json_t *j =
        json_pack("{s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:f, s:I}", "run_id",
                  s->run_id, "epoch", (json_int_t)s->epoch, "step", (json_int_t)s->step, "version",
                  (json_int_t)s->version, "position", (json_int_t)s->position, "batches_applied",
                  (json_int_t)s->batches_applied, "batches_expected",
                  (json_int_t)s->batches_expected, "duplicates", (json_int_t)s->duplicates,
                  "restreamed", (json_int_t)s->restreamed, "optim_t", (json_int_t)opt->t, "elapsed",
                  s->elapsed, "best_score", s->best_score, "best_step", (json_int_t)s->best_step);
    char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!text) {
        kd_st_writer_destroy(&w);
        return kd_err(err, errlen, "%s: cannot encode the run state", path);
    }
    kd_st_writer_metadata(w, "kdist.state", text);
    free(text);
    /* The file appears under its name only once its digest is there: written as
     * <name>.partial, digested, then renamed. A crash on the way leaves a .partial (and maybe a
     * digest with no file), which pruning removes, never a visible checkpoint that fails its
     * digest. */
    char partial[KD_PATH_MAX + 80];
    snprintf(partial, sizeof partial, "%s" PARTIAL_SUFFIX, path);
    int rc = kd_st_writer_write(w, partial, err, errlen);
    kd_st_writer_destroy(&w);
    if (rc == 0) rc = write_digest(partial, path, err, errlen);
    if (rc == 0 && rename(partial, path) != 0)
        rc = kd_err(err, errlen, "cannot rename %s to %s: %s", partial, path, strerror(errno));
    if (rc != 0) unlink(partial);
    if (rc == 0) coord_checkpoint_prune(dir, keep, s->run_id);
    return rc;
}

/* The run a checkpoint belongs to, from its metadata; -1 if it cannot be read. */
static int checkpoint_run_id(const char *path, char *run_id, size_t len) {
    kd_safetensors_t *st = NULL;
    char err[KD_ERR_LEN];
    if (kd_st_open(path, &st, err, sizeof err) != 0) return -1;
    const char *meta = kd_st_metadata(st, "kdist.state");
    json_error_t jerr;
    json_t *j = meta ? json_loads(meta, 0, &jerr) : NULL;
    const char *id = NULL;
    int rc = j && json_unpack(j, "{s:s}", "run_id", &id) == 0 ? 0 : -1;
    if (rc == 0) snprintf(run_id, len, "%s", id);
    json_decref(j);
    kd_st_close(&st);
    return rc;
}

static void remove_checkpoint(const char *path) {
    char digest[KD_PATH_MAX + 400];
    snprintf(digest, sizeof digest, "%s" DIGEST_SUFFIX, path);
    unlink(path);
    unlink(digest);
}

/* What an interrupted save leaves: ckpt-*.partial and temporary files, and digests whose
 * checkpoint never appeared. Only the coordinator writes here, and not while it prunes. */
static void remove_leftovers(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *name = e->d_name;
        size_t n = strlen(name), kp = strlen(PARTIAL_SUFFIX), kd = strlen(DIGEST_SUFFIX);
        if (strncmp(name, "ckpt-", 5) != 0) continue;
        char path[KD_PATH_MAX + 300];
        snprintf(path, sizeof path, "%s/%s", dir, name);
        bool leftover =
            strstr(name, ".tmp.") || (n > kp && strcmp(name + n - kp, PARTIAL_SUFFIX) == 0);
        if (!leftover && n > kd && strcmp(name + n - kd, DIGEST_SUFFIX) == 0) {
            path[strlen(path) - kd] = 0; /* the checkpoint it is the digest of */
            leftover = !kd_file_exists(path);
            snprintf(path, sizeof path, "%s/%s", dir, name);
        }
        if (leftover) unlink(path);
    }
    closedir(d);
}

void coord_checkpoint_prune(const char *dir, long keep, const char *run_id) {
    remove_leftovers(dir);
    ckpt_name_t *list;
    int n = list_checkpoints(dir, &list);
    long kept = 0;
    for (int i = 0; i < n; i++) {
        char path[KD_PATH_MAX + 300], err[KD_ERR_LEN], owner[KD_NAME_MAX + 64];
        snprintf(path, sizeof path, "%s/%s", dir, list[i].name);
        if (check_digest(path, err, sizeof err) != 0) {
            /* damaged or cut short: it could never be resumed from, and must not take the place
             * of one that can */
            kd_log(KD_LOG_WARN, "COORD-CKPT-PRUNE", "removing %s", err);
            remove_checkpoint(path);
        } else if (checkpoint_run_id(path, owner, sizeof owner) != 0 ||
                   strcmp(owner, run_id) != 0) {
            continue; /* another run's: neither counted nor touched */
        } else if (kept < keep) {
            kept++;
        } else {
            remove_checkpoint(path);
        }
    }
    free(list);
}

static int load_one(const char *path, coord_state_t *s, kd_model_t *m, kd_optim_t *opt,
                    uint8_t **applied, size_t *n_batches, char *err, size_t errlen) {
    kd_safetensors_t *st = NULL;
    json_t *j = NULL;
    int rc = -1;
    if (check_digest(path, err, errlen) != 0 || kd_st_open(path, &st, err, errlen) != 0) goto out;
    const char *meta = kd_st_metadata(st, "kdist.state");
    json_error_t jerr;
    if (!meta || !(j = json_loads(meta, 0, &jerr))) {
        kd_err(err, errlen, "%s: no valid kdist.state metadata", path);
        goto out;
    }
    const kd_st_tensor_t *tm = kd_st_find(st, "optim.m"), *tv = kd_st_find(st, "optim.v");
    const kd_st_tensor_t *tl = kd_st_find(st, "ledger.applied");
    if (!tm || tm->dtype != KD_DTYPE_F32 || tm->nbytes != opt->n * sizeof(float) ||
        (opt->v && (!tv || tv->nbytes != opt->n * sizeof(float))) || !tl ||
        tl->dtype != KD_DTYPE_U8) {
        kd_err(err, errlen, "%s: optimizer state or ledger missing or of the wrong size", path);
        goto out;
    }
    if (kd_checkpoint_load_into(m, st, err, errlen) != 0) goto out;
    memcpy(opt->m, kd_st_data(st, tm), tm->nbytes);
    if (opt->v) memcpy(opt->v, kd_st_data(st, tv), tv->nbytes);
    *n_batches = tl->nbytes;
    *applied = kd_xmalloc(tl->nbytes ? tl->nbytes : 1);
    memcpy(*applied, kd_st_data(st, tl), tl->nbytes);
    json_int_t t = 0, epoch = 0, step = 0, version = 0, position = 0, applied_total = 0,
               expected = 0, dups = 0, restreamed = 0, best_step = -1;
    double elapsed = 0, best = 0;
    const char *run_id = "";
    /* "best_score"; checkpoints of kdist before it kept "best_val_accuracy" */
    if (!json_object_get(j, "best_score"))
        json_object_set(j, "best_score", json_object_get(j, "best_val_accuracy"));
    json_unpack(j, "{s?s, s?I, s?I, s?I, s?I, s?I, s?I, s?I, s?I, s?I, s?F, s?F, s?I}", "run_id",
                &run_id, "epoch", &epoch, "step", &step, "version", &version, "position", &position,
                "batches_applied", &applied_total, "batches_expected", &expected, "duplicates",
                &dups, "restreamed", &restreamed, "optim_t", &t, "elapsed", &elapsed, "best_score",
                &best, "best_step", &best_step);
    snprintf(s->run_id, sizeof s->run_id, "%s", run_id);
    s->epoch = (uint32_t)epoch;
    s->step = step;
    s->version = (uint64_t)version;
    s->position = position;
    s->batches_applied = applied_total;
    s->batches_expected = expected;
    s->duplicates = dups;
    s->restreamed = restreamed;
    s->elapsed = elapsed;
    s->best_score = best;
    s->best_step = best_step;
    json_int_t since = 0;
    json_unpack(j, "{s?I}", "evals_since_best", &since);
    s->evals_since_best = since;
    opt->t = t;
    rc = 0;
out:
    json_decref(j);
    kd_st_close(&st);
    return rc;
}

int coord_checkpoint_resume(const char *dir, coord_state_t *s, kd_model_t *m, kd_optim_t *opt,
                            uint8_t **applied, size_t *n_batches, char *found, size_t foundlen) {
    ckpt_name_t *list;
    int n = list_checkpoints(dir, &list);
    int rc = 1;
    for (int i = 0; i < n && rc == 1; i++) { /* newest first; a damaged one is skipped */
        char path[KD_PATH_MAX + 300], err[KD_ERR_LEN];
        snprintf(path, sizeof path, "%s/%s", dir, list[i].name);
        if (load_one(path, s, m, opt, applied, n_batches, err, sizeof err) == 0) {
            snprintf(found, foundlen, "%s", path);
            rc = 0;
        } else {
            kd_log(KD_LOG_WARN, "COORD-CKPT-SKIP", "skipping checkpoint: %s", err);
        }
    }
    free(list);
    return rc;
}
