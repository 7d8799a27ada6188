/* checkpoint: the coordinator's resumable state in one safetensors file — the student's
 * parameters under PyTorch names (so a checkpoint also loads into PyTorch), the optimizer
 * moments, the current epoch's ledger, and the counters as JSON metadata. Written atomically,
 * then its BLAKE2b digest next to it (<file>.blake2b); on resume a checkpoint whose bytes do not
 * match its digest (damaged on disk, or cut short before the digest was written) is reported
 * and skipped, like a torn or foreign file. */
#include <dirent.h>
#include <jansson.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoint.h"
#include "kd_checkpoint.h"
#include "kd_log.h"

#define DIGEST_SUFFIX ".blake2b"

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

static int write_digest(const char *path, char *err, size_t errlen) {
    char hex[2 * crypto_generichash_BYTES + 1], digest_path[KD_PATH_MAX + 400];
    if (file_digest(path, hex, err, errlen) != 0) return -1;
    snprintf(digest_path, sizeof digest_path, "%s" DIGEST_SUFFIX, path);
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

int coord_checkpoint_save(const char *dir, const coord_state_t *s, const kd_model_t *m,
                          const kd_optim_t *opt, const uint8_t *applied, size_t n_batches,
                          long keep, char *err, size_t errlen) {
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/ckpt-%09ld.safetensors", dir, s->step);
    if (kd_checkpoint_check_finite(m, path, err, errlen) != 0) return -1;
    kd_st_writer_t *w = kd_st_writer_new();
    kd_checkpoint_add_model(w, m);
    int64_t n = (int64_t)opt->n, nb = (int64_t)n_batches;
    kd_st_writer_add(w, "optim.m", KD_DTYPE_F32, 1, &n, opt->m);
    if (opt->v) kd_st_writer_add(w, "optim.v", KD_DTYPE_F32, 1, &n, opt->v);
    kd_st_writer_add(w, "ledger.applied", KD_DTYPE_U8, 1, &nb, applied);
    json_t *j = json_pack(
        "{s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:f, s:I}", "run_id", s->run_id,
        "epoch", (json_int_t)s->epoch, "step", (json_int_t)s->step, "version",
        (json_int_t)s->version, "position", (json_int_t)s->position, "batches_applied",
        (json_int_t)s->batches_applied, "batches_expected", (json_int_t)s->batches_expected,
        "duplicates", (json_int_t)s->duplicates, "restreamed", (json_int_t)s->restreamed, "optim_t",
        (json_int_t)opt->t, "elapsed", s->elapsed, "best_val_accuracy", s->best_val_accuracy,
        "best_step", (json_int_t)s->best_step);
    json_object_set_new(j, "evals_since_best", json_integer(s->evals_since_best));
    char *text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    kd_st_writer_metadata(w, "kdist.state", text);
    free(text);
    int rc = kd_st_writer_write(w, path, err, errlen);
    kd_st_writer_destroy(&w);
    if (rc == 0) rc = write_digest(path, err, errlen);
    if (rc == 0) coord_checkpoint_prune(dir, keep);
    return rc;
}

static int is_ckpt(const struct dirent *e) {
    const char *suffix = ".safetensors";
    size_t n = strlen(e->d_name), k = strlen(suffix);
    return strncmp(e->d_name, "ckpt-", 5) == 0 && n > k && strcmp(e->d_name + n - k, suffix) == 0 &&
           !strstr(e->d_name, ".tmp.");
}

void coord_checkpoint_prune(const char *dir, long keep) {
    struct dirent **names;
    int n = scandir(dir, &names, is_ckpt, alphasort);
    if (n < 0) return;
    for (int i = 0; i < n; i++) {
        if (i < n - keep) {
            char path[KD_PATH_MAX + 300];
            snprintf(path, sizeof path, "%s/%s", dir, names[i]->d_name);
            unlink(path);
            strncat(path, DIGEST_SUFFIX, sizeof path - strlen(path) - 1);
            unlink(path);
        }
        free(names[i]);
    }
    free(names);
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
    json_unpack(j, "{s?s, s?I, s?I, s?I, s?I, s?I, s?I, s?I, s?I, s?I, s?F, s?F, s?I}", "run_id",
                &run_id, "epoch", &epoch, "step", &step, "version", &version, "position", &position,
                "batches_applied", &applied_total, "batches_expected", &expected, "duplicates",
                &dups, "restreamed", &restreamed, "optim_t", &t, "elapsed", &elapsed,
                "best_val_accuracy", &best, "best_step", &best_step);
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
    s->best_val_accuracy = best;
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
    struct dirent **names;
    int n = scandir(dir, &names, is_ckpt, alphasort);
    if (n <= 0) return 1;
    int rc = 1;
    for (int i = n - 1; i >= 0; i--) { /* newest first; a torn one is skipped */
        char path[KD_PATH_MAX + 300], err[KD_ERR_LEN];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]->d_name);
        if (rc == 1) {
            if (load_one(path, s, m, opt, applied, n_batches, err, sizeof err) == 0) {
                snprintf(found, foundlen, "%s", path);
                rc = 0;
            } else {
                kd_log(KD_LOG_WARN, "COORD-CKPT-SKIP", "skipping checkpoint: %s", err);
            }
        }
        free(names[i]);
    }
    free(names);
    return rc;
}
