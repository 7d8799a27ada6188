/* test_tokens: language-model data: llm.c and nanoGPT token files (written, read back, and
 * malformed ones refused with the file and the problem), text through the tokenizers into
 * train | val | test windows with the recipe's geometry, bits-per-byte byte counts, and the
 * data fingerprint covering ids, tokenizer and windowing. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_cache.h"
#include "kd_test.h"
#include "kd_tokens.h"
#include "kd_util.h"

static const char *tmp;

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

static void write_bytes(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(data, 1, len, f) == len);
    if (f) fclose(f);
}

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void expect_read_error(const char *name, const void *data, size_t len, const char *want) {
    const char *path = tmp_path(name);
    write_bytes(path, data, len);
    kd_token_stream_t s = {0};
    char err[KD_ERR_LEN] = "";
    CHECK(kd_tokens_read_file(path, &s, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, path);
    CHECK_ERR_HAS(err, want);
    CHECK(s.n == 0);
    free(s.ids);
}

static void test_token_files(void) {
    uint32_t ids[1000];
    for (int i = 0; i < 1000; i++) ids[i] = (uint32_t)(i * 7919 % 50257);
    char err[KD_ERR_LEN];
    const char *llmc = tmp_path("a.bin");
    CHECK(kd_tokens_write_llmc(llmc, ids, 1000, err, sizeof err) == 0);
    kd_token_stream_t s = {0};
    CHECK(kd_tokens_read_file(llmc, &s, err, sizeof err) == 0);
    CHECK(s.n == 1000 && memcmp(s.ids, ids, sizeof ids) == 0);
    /* the header as llm.c writes it: 256 int32, magic, version 1, count, then uint16 */
    uint8_t *raw;
    size_t len;
    CHECK(kd_read_file(llmc, &raw, &len, err, sizeof err) == 0);
    CHECK(len == 1024 + 2000);
    CHECK(raw[0] == (KD_LLMC_MAGIC & 0xff) && raw[4] == 1 && raw[8] == (1000 & 0xff) &&
          raw[9] == 1000 >> 8);
    /* nanoGPT's raw uint16: appended to the same stream */
    write_bytes(tmp_path("nano.bin"), raw + 1024, 2000);
    CHECK(kd_tokens_read_file(tmp_path("nano.bin"), &s, err, sizeof err) == 0);
    CHECK(s.n == 2000 && memcmp(s.ids + 1000, ids, sizeof ids) == 0);
    free(s.ids);
    /* version 2: uint32 */
    uint8_t v2[1024 + 12] = {0};
    put_u32(v2, KD_LLMC_MAGIC), put_u32(v2 + 4, 2), put_u32(v2 + 8, 3);
    put_u32(v2 + 1024, 70000), put_u32(v2 + 1028, 1), put_u32(v2 + 1032, 128000);
    memset(&s, 0, sizeof s);
    write_bytes(tmp_path("v2.bin"), v2, sizeof v2);
    CHECK(kd_tokens_read_file(tmp_path("v2.bin"), &s, err, sizeof err) == 0);
    CHECK(s.n == 3 && s.ids[0] == 70000 && s.ids[2] == 128000);
    free(s.ids);

    /* malformed */
    uint8_t bad[1024 + 20];
    memcpy(bad, raw, sizeof bad);
    put_u32(bad + 4, 7);
    expect_read_error("version.bin", bad, sizeof bad, "version 7");
    memcpy(bad, raw, sizeof bad);
    put_u32(bad + 8, 5000); /* lies: 5000 tokens, 10 there */
    expect_read_error("lying.bin", bad, sizeof bad, "the header says 5000 tokens");
    expect_read_error("truncated.bin", raw, 1024 + 1999, "the header says 1000 tokens");
    expect_read_error("short_header.bin", raw, 100, "truncated in its header");
    expect_read_error("odd.bin", "abc", 3, "neither an llm.c token file");
    expect_read_error("empty.bin", "", 0, "holds no tokens");
    kd_token_stream_t none = {0};
    CHECK(kd_tokens_read_file(tmp_path("missing.bin"), &none, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "missing.bin");
    uint32_t big[2] = {1, 70000};
    CHECK(kd_tokens_write_llmc(tmp_path("big.bin"), big, 2, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "token 1 is 70000");
    free(raw);
}

static kd_recipe_t lm_recipe(const char *file, const char *tokenizer, int context) {
    kd_recipe_t r;
    kd_recipe_defaults(&r);
    r.data.format = KD_DATA_TEXT;
    r.data.n_files = 1;
    snprintf(r.data.files[0], sizeof r.data.files[0], "%s", file);
    snprintf(r.data.tokenizer, sizeof r.data.tokenizer, "%s", tokenizer);
    r.data.dir[0] = 0;
    r.student.gpt = (kd_gpt_config_t){.layers = 1, .width = 8, .heads = 2, .context = context};
    r.data.val_fraction = 0.1f;
    r.data.test_fraction = 0.1f;
    return r;
}

static void test_text_windows(void) {
    /* 1000 bytes of text: train 800, val 100, test 100 tokens with the bytes tokenizer */
    char text[1000];
    for (int i = 0; i < 1000; i++) text[i] = (char)('a' + i % 26);
    const char *path = tmp_path("alpha.txt");
    write_bytes(path, text, sizeof text);
    kd_recipe_t r = lm_recipe(path, "bytes", 16);
    kd_dataset_t *train, *val, *test;
    char err[KD_ERR_LEN];
    CHECK(kd_tokens_load_splits(&r, &train, &val, &test, err, sizeof err) == 0);
    /* windows of 17, 16 apart: (800 - 17) / 16 + 1 = 49; (100 - 17) / 16 + 1 = 6 */
    CHECK(train->n == 49 && val->n == 6 && test->n == 6);
    CHECK(train->window == 17 && train->num_classes == 257 &&
          strcmp(train->tokenizer, "bytes") == 0);
    uint32_t w[2 * 17], ids[2] = {0, 48};
    kd_dataset_gather_windows(train, ids, 2, w);
    CHECK(w[0] == 'a' && w[16] == (uint32_t)('a' + 16 % 26) &&
          w[17] == (uint32_t)('a' + (48 * 16) % 26));
    kd_dataset_gather_windows(val, ids, 1, w); /* validation starts at token 800 */
    CHECK(w[0] == (uint32_t)('a' + 800 % 26));
    /* bytes tokenizer: one byte per target */
    CHECK(kd_dataset_target_bytes(val, ids, 1) == 16.0);

    char fp1[KD_CACHE_FP_HEX + 1], fp2[KD_CACHE_FP_HEX + 1];
    kd_cache_fingerprint_data(train, NULL, fp1);
    kd_dataset_destroy(&train), kd_dataset_destroy(&val), kd_dataset_destroy(&test);
    r.data.stride = 8; /* another windowing: another fingerprint, and twice the windows */
    CHECK(kd_tokens_load_splits(&r, &train, &val, &test, err, sizeof err) == 0);
    CHECK(train->n == 98);
    kd_cache_fingerprint_data(train, NULL, fp2);
    CHECK(strcmp(fp1, fp2) != 0);
    kd_dataset_destroy(&train), kd_dataset_destroy(&val), kd_dataset_destroy(&test);
    r.data.stride = 0;
    r.data.train_subset = 10;
    r.data.val_windows = 2;
    CHECK(kd_tokens_load_splits(&r, &train, &val, &test, err, sizeof err) == 0);
    CHECK(train->n == 10 && val->n == 2 && test->n == 6);
    kd_cache_fingerprint_data(train, NULL, fp2);
    CHECK(strcmp(fp1, fp2) != 0);
    kd_dataset_destroy(&train), kd_dataset_destroy(&val), kd_dataset_destroy(&test);

    /* two files: end-of-text between them */
    r.data.train_subset = r.data.val_windows = 0;
    r.data.n_files = 2;
    snprintf(r.data.files[1], sizeof r.data.files[1], "%s", path);
    CHECK(kd_tokens_load_splits(&r, &train, &val, &test, err, sizeof err) == 0);
    ids[0] = 62; /* window 62 covers tokens 992..1008: the boundary at 1000 */
    kd_dataset_gather_windows(train, ids, 1, w);
    CHECK(w[8] == 256 && w[7] == (uint32_t)('a' + 999 % 26) && w[9] == 'a');
    kd_dataset_destroy(&train), kd_dataset_destroy(&val), kd_dataset_destroy(&test);

    /* too little text for a validation window, named with the fix */
    r.data.n_files = 1;
    r.student.gpt.context = 200;
    CHECK(kd_tokens_load_splits(&r, &train, &val, &test, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "the validation part has 100 tokens, fewer than one window");
    CHECK(!train && !val && !test);
}

static void test_gpt2_text(void) {
    const char *path = tmp_path("gpt2.txt");
    const char *text = "Hello world. In the beginning God created the heaven and the earth. ";
    char buf[4096] = "";
    for (int i = 0; i < 50; i++) strcat(buf, text);
    write_bytes(path, buf, strlen(buf));
    kd_recipe_t r = lm_recipe(path, "gpt2", 8);
    kd_dataset_t *train, *val, *test;
    char err[KD_ERR_LEN];
    if (kd_tokens_load_splits(&r, &train, &val, &test, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n(GPT-2's files come from scripts/install-deps.sh)\n", err);
        CHECK(!"gpt2 text loads");
        return;
    }
    CHECK(train->num_classes == 50257 && strcmp(train->tokenizer, "gpt2") == 0);
    uint32_t w[9], id = 0;
    kd_dataset_gather_windows(train, &id, 1, w);
    CHECK(w[0] == 15496 && w[1] == 995); /* "Hello", " world" */
    /* the targets " world" "." " In" " the" " beginning" " God" " created" " the": their bytes */
    CHECK(kd_dataset_target_bytes(train, &id, 1) == 6 + 1 + 3 + 4 + 10 + 4 + 8 + 4);
    kd_dataset_destroy(&train), kd_dataset_destroy(&val), kd_dataset_destroy(&test);

    /* text that is not UTF-8: the file and the byte named */
    const char *latin1 = tmp_path("latin1.txt");
    char bad[600];
    memset(bad, 'x', sizeof bad);
    bad[321] = (char)0xe9;
    write_bytes(latin1, bad, sizeof bad);
    r = lm_recipe(latin1, "gpt2", 8);
    CHECK(kd_tokens_load_splits(&r, &train, &val, &test, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, latin1);
    CHECK_ERR_HAS(err, "byte offset 321");
    CHECK_ERR_HAS(err, "needs UTF-8");
    /* the bytes tokenizer takes any bytes */
    r = lm_recipe(latin1, "bytes", 8);
    CHECK(kd_tokens_load_splits(&r, &train, &val, &test, err, sizeof err) == 0);
    kd_dataset_destroy(&train), kd_dataset_destroy(&val), kd_dataset_destroy(&test);

    /* token shards whose ids do not fit the vocabulary */
    uint32_t ids[400];
    for (int i = 0; i < 400; i++) ids[i] = i == 123 ? 300 : (uint32_t)(i % 256);
    CHECK(kd_tokens_write_llmc(tmp_path("toks.bin"), ids, 400, err, sizeof err) == 0);
    r = lm_recipe(tmp_path("toks.bin"), "bytes", 8);
    r.data.format = KD_DATA_TOKENS;
    CHECK(kd_tokens_load_splits(&r, &train, &val, &test, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "toks.bin: token 123 is 300, outside the vocabulary of 257");
}

int main(void) {
    tmp = kd_test_tmpdir("test_tokens");
    test_token_files();
    test_text_windows();
    test_gpt2_text();
    if (!kd_test_failures) {
        char cmd[1100];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", tmp);
    }
    return kd_test_done("test_tokens");
}
