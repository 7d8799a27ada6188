/* test_coord_checkpoint: the coordinator's checkpoint retention and resume rules, on real files
 * and without processes — a save never overwrites a checkpoint in place (two saves at one step
 * are two files), pruning keeps the newest `keep` files that match their digest and belong to
 * this run (damaged ones go, other runs' files are neither counted nor touched), resume takes
 * the newest valid one, a file gets its checkpoint name only once its digest is written (what
 * an interrupted save leaves is removed), non-finite weights are never written. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "checkpoint.h"
#include "kd_test.h"
#include "kd_util.h"

#define N_BATCHES 7

static char dir[1024];

static const kd_layer_spec_t MLP[] = {
    {.kind = KD_LAYER_FLATTEN},
    {.kind = KD_LAYER_LINEAR, .out_features = 4},
};

/* Checkpoint names in dir (the .safetensors files only), sorted, joined by spaces. */
static const char *listing(void) {
    static char out[4096];
    out[0] = 0;
    struct dirent **names;
    int n = scandir(dir, &names, NULL, alphasort);
    for (int i = 0; i < n; i++) {
        const char *s = names[i]->d_name;
        size_t len = strlen(s);
        if (strncmp(s, "ckpt-", 5) == 0 && len > 12 && strcmp(s + len - 12, ".safetensors") == 0) {
            strncat(out, s, sizeof out - strlen(out) - 2);
            strcat(out, " ");
        }
        free(names[i]);
    }
    free(names);
    return out;
}

static int save(const kd_model_t *m, const kd_optim_t *opt, const char *run_id, long step,
                long keep) {
    coord_state_t s = {.step = step, .epoch = 1, .best_step = -1};
    snprintf(s.run_id, sizeof s.run_id, "%s", run_id);
    uint8_t applied[N_BATCHES] = {1, 1, 0, 1};
    char err[KD_ERR_LEN];
    int rc = coord_checkpoint_save(dir, &s, m, opt, applied, N_BATCHES, keep, err, sizeof err);
    if (rc) fprintf(stderr, "save: %s\n", err);
    return rc;
}

static void flip_byte(const char *name, long offset) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r+b");
    CHECK(f != NULL);
    if (!f) return;
    fseek(f, offset, SEEK_END);
    int c = fgetc(f);
    fseek(f, offset, SEEK_END);
    fputc(c ^ 0x5a, f);
    fclose(f);
}

int main(void) {
    snprintf(dir, sizeof dir, "%s", kd_test_tmpdir("test_coord_checkpoint"));
    kd_model_t *m = NULL;
    char err[KD_ERR_LEN];
    CHECK(kd_model_new(MLP, 2, (kd_shape_t){1, 2, 3}, &m, err, sizeof err) == 0);
    kd_optim_config_t cfg = {.kind = KD_OPT_SGD, .momentum = 0.9f};
    kd_optim_t *opt = kd_optim_new(&cfg, m->n_params);
    for (size_t i = 0; i < m->n_params; i++) m->params[i] = 0.01f * (float)i;

    /* Two saves at one step: two files; the first is not rewritten. */
    CHECK(save(m, opt, "runA", 5, 3) == 0);
    CHECK(save(m, opt, "runA", 5, 3) == 0);
    CHECK(strcmp(listing(), "ckpt-000000005-000.safetensors ckpt-000000005-001.safetensors ") == 0);

    /* keep: the newest valid ones of this run. */
    CHECK(save(m, opt, "runA", 6, 2) == 0);
    CHECK(strcmp(listing(), "ckpt-000000005-001.safetensors ckpt-000000006-000.safetensors ") == 0);

    /* Resume takes the newest; a damaged newest is skipped for the one before. */
    coord_state_t s = {0};
    uint8_t *applied = NULL;
    size_t nb = 0;
    char found[2048];
    m->params[0] = 42.0f;
    CHECK(coord_checkpoint_resume(dir, &s, m, opt, &applied, &nb, found, sizeof found) == 0);
    CHECK(strstr(found, "ckpt-000000006-000") != NULL && s.step == 6 && nb == N_BATCHES);
    CHECK(applied && applied[0] == 1 && applied[2] == 0);
    CHECK(m->params[0] == 0.0f && strcmp(s.run_id, "runA") == 0);
    free(applied);
    applied = NULL;
    flip_byte("ckpt-000000006-000.safetensors", -3);
    CHECK(coord_checkpoint_resume(dir, &s, m, opt, &applied, &nb, found, sizeof found) == 0);
    CHECK(strstr(found, "ckpt-000000005-001") != NULL && s.step == 5);
    free(applied);
    applied = NULL;

    /* Pruning drops the damaged file instead of keeping it in a valid one's place (keep 2: the
     * new one and 5-001). */
    CHECK(save(m, opt, "runA", 7, 2) == 0);
    CHECK(strcmp(listing(), "ckpt-000000005-001.safetensors ckpt-000000007-000.safetensors ") == 0);

    /* Another run's checkpoint (newer) is neither counted nor removed. */
    CHECK(save(m, opt, "runB", 100, 5) == 0);
    CHECK(save(m, opt, "runA", 8, 1) == 0);
    CHECK(strcmp(listing(), "ckpt-000000008-000.safetensors ckpt-000000100-000.safetensors ") == 0);
    CHECK(coord_checkpoint_count(dir) == 2);

    /* A file cut short before its digest was written is invalid and is skipped. */
    char path[2048];
    snprintf(path, sizeof path, "%s/ckpt-000000100-000.safetensors.blake2b", dir);
    CHECK(unlink(path) == 0);
    CHECK(coord_checkpoint_resume(dir, &s, m, opt, &applied, &nb, found, sizeof found) == 0);
    CHECK(strstr(found, "ckpt-000000008-000") != NULL);
    free(applied);
    applied = NULL;

    /* A save interrupted before its file got its name leaves a .partial (with or without a
     * digest beside the final name) and temporary files: none is a checkpoint, resume ignores
     * them, and the next save removes them. */
    const char *leftovers[] = {"ckpt-000000200-000.safetensors.partial",
                               "ckpt-000000200-000.safetensors.blake2b",
                               "ckpt-000000300-000.safetensors.partial.tmp.99.1",
                               "ckpt-000000300-000.safetensors.blake2b.tmp.99.2"};
    for (size_t i = 0; i < sizeof leftovers / sizeof leftovers[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, leftovers[i]);
        CHECK(kd_write_file_atomic(path, "interrupted", 11, err, sizeof err) == 0);
    }
    CHECK(coord_checkpoint_resume(dir, &s, m, opt, &applied, &nb, found, sizeof found) == 0);
    CHECK(strstr(found, "ckpt-000000008-000") != NULL);
    free(applied);
    applied = NULL;
    CHECK(save(m, opt, "runA", 8, 3) == 0);
    for (size_t i = 0; i < sizeof leftovers / sizeof leftovers[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, leftovers[i]);
        bool gone = !kd_file_exists(path);
        CHECK(gone);
        if (!gone) fprintf(stderr, "left behind: %s\n", leftovers[i]);
    }
    snprintf(path, sizeof path, "%s/ckpt-000000008-001.safetensors.blake2b", dir);
    CHECK(kd_file_exists(path)); /* the new one's digest stays */
    /* (and runB's file, cut short above, is pruned as damaged) */
    CHECK(strcmp(listing(), "ckpt-000000008-000.safetensors ckpt-000000008-001.safetensors ") == 0);

    /* Non-finite weights are never written. */
    m->params[1] = NAN;
    coord_state_t bad = {.step = 9, .best_step = -1};
    uint8_t ledger[N_BATCHES] = {0};
    CHECK(coord_checkpoint_save(dir, &bad, m, opt, ledger, N_BATCHES, 3, err, sizeof err) != 0);
    CHECK_ERR_HAS(err, "not finite");
    CHECK(strstr(listing(), "ckpt-000000009") == NULL);

    /* Nothing valid left: resume says there is none (the coordinator turns that into an error
     * when files exist). */
    for (const char *name = strtok(strcpy(path, listing()), " "); name; name = strtok(NULL, " "))
        flip_byte(name, -2);
    CHECK(coord_checkpoint_resume(dir, &s, m, opt, &applied, &nb, found, sizeof found) == 1);
    CHECK(coord_checkpoint_count(dir) == 2);
    free(applied);

    kd_optim_destroy(&opt);
    kd_model_destroy(&m);
    return kd_test_done("test_coord_checkpoint");
}
