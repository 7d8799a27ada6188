/* test_cli: the kdist command as a user runs it — `kdist eval` of PyTorch-written weights
 * reproduces PyTorch's logits through --dump-logits; `kdist train` leaves recipe.yaml,
 * student.safetensors and summary.json, and eval of those weights agrees with the summary;
 * `kdist data prepare` writes token shards that a tokens recipe reads as the same windows as the
 * text recipe; bad input gives a non-zero exit and a message naming the file and the problem. */
#include <jansson.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "kd_npy.h"
#include "kd_safetensors.h"
#include "kd_test.h"
#include "kd_tokens.h"
#include "kd_util.h"

static char kdist[KD_PATH_MAX];
static char bin_dir[KD_PATH_MAX];
static char out_buf[65536];

/* Runs a shell command line, capturing stdout+stderr into out_buf; returns the exit code. */
#define run(...) kd_test_run(out_buf, sizeof out_buf, __VA_ARGS__)

static void write_text(const char *path, const char *text) {
    char err[KD_ERR_LEN];
    if (kd_write_file_atomic(path, text, strlen(text), err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
}

static const char *mlp_small_recipe = "name: cli_mlp_small\n"
                                      "student:\n"
                                      "  layers:\n"
                                      "    - {type: flatten}\n"
                                      "    - {type: linear, out_features: 32}\n"
                                      "    - {type: relu}\n"
                                      "    - {type: linear, out_features: 10}\n";

static void test_eval_matches_pytorch(const char *tmp) {
    char recipe[KD_PATH_MAX], npy[KD_PATH_MAX];
    snprintf(recipe, sizeof recipe, "%s/mlp_small.yaml", tmp);
    snprintf(npy, sizeof npy, "%s/logits.npy", tmp);
    write_text(recipe, mlp_small_recipe);
    int rc = run("%s eval data/mlp_small.safetensors --recipe %s --split test --dump-logits %s "
                 "data.test_subset=8",
                 kdist, recipe, npy);
    CHECK(rc == 0);
    CHECK_ERR_HAS(out_buf, "(8 samples)");

    char err[KD_ERR_LEN];
    float *logits = NULL;
    size_t rows = 0, cols = 0;
    CHECK(kd_npy_read_f32(npy, &logits, &rows, &cols, err, sizeof err) == 0);
    CHECK(rows == 8 && cols == 10);
    kd_safetensors_t *io = NULL;
    CHECK(kd_st_open("data/mlp_small_io.safetensors", &io, err, sizeof err) == 0);
    const kd_st_tensor_t *t = io ? kd_st_find(io, "logits") : NULL;
    CHECK(t && t->nbytes == 80 * sizeof(float));
    if (logits && t && rows == 8 && cols == 10) {
        float want[80];
        memcpy(want, kd_st_data(io, t), sizeof want);
        for (int i = 0; i < 80; i++) CHECK_CLOSE(logits[i], want[i], 1e-4);
    }
    free(logits);
    kd_st_close(&io);
}

static void test_eval_errors(const char *tmp) {
    char recipe[KD_PATH_MAX], bad[KD_PATH_MAX];
    snprintf(recipe, sizeof recipe, "%s/mlp_small.yaml", tmp);
    snprintf(bad, sizeof bad, "%s/typo.yaml", tmp);

    CHECK(run("%s eval %s/missing.safetensors --recipe %s", kdist, tmp, recipe) == 1);
    CHECK_ERR_HAS(out_buf, "missing.safetensors");

    /* Weights of another architecture: the message names the tensor. */
    CHECK(run("%s eval data/cnn_small.safetensors --recipe %s", kdist, recipe) == 1);
    CHECK_ERR_HAS(out_buf, "layers.");

    write_text(bad, "name: x\nstudent:\n  layers:\n    - {type: flatten}\n"
                    "distill:\n  temprature: 3\n");
    CHECK(run("%s eval data/mlp_small.safetensors --recipe %s", kdist, bad) == 1);
    CHECK_ERR_HAS(out_buf, "typo.yaml:6:3:");
    CHECK_ERR_HAS(out_buf, "did you mean 'temperature'");

    CHECK(run("%s eval data/mlp_small.safetensors --recipe %s --split nope", kdist, recipe) == 1);
    CHECK_ERR_HAS(out_buf, "--split");
    CHECK(run("%s eval", kdist) == 2);
    CHECK(run("%s frobnicate", kdist) == 2);
    CHECK_ERR_HAS(out_buf, "unknown command 'frobnicate'");
}

static void test_train_then_eval(const char *tmp) {
    int rc = run("%s train ../recipes/fashion_mlp_student.yaml name=cli_train logging.runs_dir=%s "
                 "train.epochs=1 data.train_subset=3000 data.val_size=500 data.test_subset=1000",
                 kdist, tmp);
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "%s\n", out_buf);
    char path[KD_PATH_MAX];
    const char *files[] = {"recipe.yaml", "student.safetensors", "summary.json"};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/cli_train/%s", tmp, files[i]);
        CHECK(kd_file_exists(path));
    }
    snprintf(path, sizeof path, "%s/cli_train/summary.json", tmp);
    json_error_t jerr;
    json_t *summary = json_load_file(path, 0, &jerr);
    CHECK(summary != NULL);
    double acc = json_real_value(json_object_get(summary, "test_accuracy"));
    CHECK(acc > 0.5 && acc <= 1.0); /* 2500 samples, one epoch: well above chance (0.1) */
    CHECK(strcmp(json_string_value(json_object_get(summary, "status")), "completed") == 0);
    json_decref(summary);

    /* The saved recipe and weights reproduce the summary's test accuracy. */
    rc = run("%s eval %s/cli_train/student.safetensors --recipe %s/cli_train/recipe.yaml", kdist,
             tmp, tmp);
    CHECK(rc == 0);
    char want[64];
    snprintf(want, sizeof want, "accuracy %.2f%%", 100.0 * acc);
    CHECK_ERR_HAS(out_buf, want);
}

/* Secure by default off loopback: the coordinator and a teacher refuse to bind a non-loopback
 * address without CurveZMQ (exit 2, naming cluster.security.allow_plaintext) before they load
 * anything; loopback, and a recipe that says allow_plaintext, still start. */
static void test_plaintext_bind(const char *tmp) {
    char recipe[KD_PATH_MAX + 64], run_dir[KD_PATH_MAX + 64];
    snprintf(recipe, sizeof recipe, "%s/plain_bind.yaml", tmp);
    write_text(recipe, "name: cli_plain_bind\n"
                       "student:\n"
                       "  layers:\n"
                       "    - {type: flatten}\n"
                       "    - {type: linear, out_features: 10}\n"
                       "data: {train_subset: 300, val_size: 100, test_subset: 100}\n");
    snprintf(run_dir, sizeof run_dir, "%s/plain_bind_run", tmp);
    unsetenv("KDIST_KEY");
    int rc = run("%s/kdist-coordinator --recipe %s --run-dir %s cluster.bind=tcp://0.0.0.0:5555",
                 bin_dir, recipe, run_dir);
    CHECK(rc == 2);
    CHECK_ERR_HAS(out_buf, "cluster.bind is tcp://0.0.0.0:5555");
    CHECK_ERR_HAS(out_buf, "cluster.security.allow_plaintext: true");
    rc = run("%s/kdist-coordinator --recipe %s --run-dir %s cluster.bind=tcp://*:0", bin_dir,
             recipe, run_dir);
    CHECK(rc == 2);
    CHECK_ERR_HAS(out_buf, "cluster.security.allow_plaintext");
    rc = run("%s/kdist-teacher --coordinator tcp://127.0.0.1:1 --id 0 --recipe %s "
             "--stream-bind tcp://0.0.0.0:0",
             bin_dir, recipe);
    CHECK(rc == 2);
    CHECK_ERR_HAS(out_buf, "--stream-bind is tcp://0.0.0.0:0");
    CHECK_ERR_HAS(out_buf, "cluster.security.allow_plaintext");

    /* loopback, and a deliberately insecure recipe, start: the endpoint file says so; the
     * coordinator (no teacher ever comes) is then stopped with SIGTERM */
    const char *binds[] = {"tcp://127.0.0.1:0",
                           "tcp://0.0.0.0:0 cluster.security.allow_plaintext=true"};
    for (int i = 0; i < 2; i++) {
        char dir[KD_PATH_MAX + 96];
        snprintf(dir, sizeof dir, "%s/plain_bind_ok%d", tmp, i);
        rc = run("%s/kdist-coordinator --recipe %s --run-dir %s cluster.bind=%s & pid=$!; "
                 "for _ in $(seq 300); do [ -s %s/coordinator.endpoint ] && break; "
                 "kill -0 $pid 2>/dev/null || break; sleep 0.1; done; "
                 "[ -s %s/coordinator.endpoint ]; ok=$?; kill -TERM $pid; wait $pid; exit $ok",
                 bin_dir, recipe, dir, binds[i], dir, dir);
        if (rc != 0) fprintf(stderr, "cluster.bind=%s did not start:\n%s\n", binds[i], out_buf);
        CHECK(rc == 0);
    }
}

/* The windows of a recipe's splits: its three datasets, for comparing two recipes' data. */
static void load_lm_recipe(const char *path, kd_dataset_t *parts[3]) {
    char err[KD_ERR_LEN];
    kd_recipe_t r;
    parts[0] = parts[1] = parts[2] = NULL;
    if (kd_recipe_load(path, NULL, 0, &r, err, sizeof err) != 0 ||
        kd_tokens_load_splits(&r, &parts[0], &parts[1], &parts[2], err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        CHECK(!"the recipe's data loads");
    }
}

/* kdist data prepare: one llm.c shard per text file; the recipe lines it prints read the same
 * token stream (end-of-text between files) as the text recipe, so the windows, their count and
 * the bytes behind bits per byte agree; malformed input is refused naming the file. */
static void test_data_prepare(const char *tmp) {
    char a[KD_PATH_MAX + 32], b[KD_PATH_MAX + 32], shards[KD_PATH_MAX + 32];
    snprintf(a, sizeof a, "%s/psalm.txt", tmp);
    snprintf(b, sizeof b, "%s/proverbs.md", tmp);
    snprintf(shards, sizeof shards, "%s/shards", tmp);
    char text[8192] = "";
    for (int i = 0; i < 40; i++)
        strcat(text,
               "The LORD is my shepherd; I shall not want.  It's caf\xc3\xa9 \xe2\x80\x94 ok\n");
    write_text(a, text);
    write_text(b, "A soft answer turneth away wrath:\n\n\tbut grievous words stir up anger.\n");
    CHECK(run("%s data prepare --tokenizer gpt2 %s %s --out %s", kdist, a, b, shards) == 0);
    CHECK_ERR_HAS(out_buf, "psalm.bin");
    CHECK_ERR_HAS(out_buf, "format: tokens");
    CHECK_ERR_HAS(out_buf, "files: [psalm.bin, proverbs.bin]");

    const char *common = "name: prepared\nstudent:\n  gpt: {layers: 1, width: 8, heads: 2, "
                         "context: 16}\n";
    char text_recipe[KD_PATH_MAX + 32], tokens_recipe[KD_PATH_MAX + 32], yaml[4 * KD_PATH_MAX];
    snprintf(text_recipe, sizeof text_recipe, "%s/prepared_text.yaml", tmp);
    snprintf(tokens_recipe, sizeof tokens_recipe, "%s/prepared_tokens.yaml", tmp);
    snprintf(yaml, sizeof yaml,
             "%sdata: {format: text, tokenizer: gpt2, dir: %s, files: [psalm.txt, proverbs.md], "
             "val_fraction: 0.1, test_fraction: 0.1}\n",
             common, tmp);
    write_text(text_recipe, yaml);
    snprintf(yaml, sizeof yaml,
             "%sdata: {format: tokens, tokenizer: gpt2, dir: %s, files: [psalm.bin, proverbs.bin], "
             "val_fraction: 0.1, test_fraction: 0.1}\n",
             common, shards);
    write_text(tokens_recipe, yaml);
    kd_dataset_t *from_text[3], *from_tokens[3];
    load_lm_recipe(text_recipe, from_text);
    load_lm_recipe(tokens_recipe, from_tokens);
    for (int p = 0; p < 3 && from_text[p] && from_tokens[p]; p++) {
        const kd_dataset_t *x = from_text[p], *y = from_tokens[p];
        CHECK(x->n > 0 && x->n == y->n && x->n_tokens == y->n_tokens);
        CHECK(memcmp(x->tokens, y->tokens, x->n_tokens * sizeof *x->tokens) == 0);
        uint32_t first = 0;
        CHECK(kd_dataset_target_bytes(x, &first, 1) == kd_dataset_target_bytes(y, &first, 1));
    }
    for (int p = 0; p < 3; p++)
        kd_dataset_destroy(&from_text[p]), kd_dataset_destroy(&from_tokens[p]);

    /* refusals: text that is not UTF-8, a missing file, two inputs onto one shard, no --out */
    char latin1[KD_PATH_MAX + 32];
    snprintf(latin1, sizeof latin1, "%s/latin1.txt", tmp);
    write_text(latin1, "caf\xe9\n");
    CHECK(run("%s data prepare --tokenizer gpt2 %s --out %s", kdist, latin1, shards) == 1);
    CHECK_ERR_HAS(out_buf, "latin1.txt: invalid UTF-8 at byte offset 3");
    CHECK(run("%s data prepare --tokenizer bytes %s/none.txt --out %s", kdist, tmp, shards) == 1);
    CHECK_ERR_HAS(out_buf, "none.txt");
    CHECK(run("%s data prepare --tokenizer bytes %s %s/x/psalm.txt --out %s", kdist, a, tmp,
              shards) == 2);
    CHECK_ERR_HAS(out_buf, "would both be written to");
    CHECK(run("%s data prepare --tokenizer bytes %s", kdist, a) == 2);
    CHECK_ERR_HAS(out_buf, "--out is missing");
    CHECK(run("%s data prepare --tokenizer sentencepiece %s --out %s", kdist, a, shards) == 1);
    CHECK_ERR_HAS(out_buf, "unknown tokenizer");
}

/* docs/recipe.md carries the reference exactly as `kdist recipe keys` prints it. */
static void test_recipe_doc_is_current(void) {
    CHECK(run("%s recipe keys", kdist) == 0);
    uint8_t *doc = NULL;
    size_t len = 0;
    char err[KD_ERR_LEN];
    CHECK(kd_read_file("../docs/recipe.md", &doc, &len, err, sizeof err) == 0);
    bool current = doc && strstr((const char *)doc, out_buf) != NULL;
    if (!current)
        fprintf(stderr,
                "docs/recipe.md is stale: paste the output of `kdist recipe keys` into it\n");
    CHECK(current);
    free(doc);
}

int main(void) {
    const char *bin = getenv("KD_BIN_DIR");
    snprintf(kdist, sizeof kdist, "%s/kdist", bin ? bin : "../build/bin");
    snprintf(bin_dir, sizeof bin_dir, "%s", bin ? bin : "../build/bin");
    const char *tmp = kd_test_tmpdir("test_cli");
    test_eval_matches_pytorch(tmp);
    test_eval_errors(tmp);
    test_train_then_eval(tmp);
    test_recipe_doc_is_current();
    test_data_prepare(tmp);
    test_plaintext_bind(tmp);
    return kd_test_done("test_cli");
}
