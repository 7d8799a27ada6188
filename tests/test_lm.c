/* test_lm: a GPT recipe end to end through the kdist command, on a synthetic text whose
 * entropy is known: characters drawn independently with probabilities 1/2, 1/4, 1/8, 1/8, so
 * no model can do better than 1.75 bits per byte, and one that learnt the source gets close.
 * `kdist train` writes the student with its config.json and a summary with perplexity and bits
 * per byte; `kdist eval` dumps logits and token windows; `kdist sample` is the same for a seed;
 * bad text is refused naming the file; the cluster refuses the recipe with the fix. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_rng.h"
#include "kd_test.h"
#include "kd_util.h"

#define ENTROPY_BITS 1.75

static char kdist[KD_PATH_MAX];
static char out[65536];
static const char *tmp;

#define run(...) kd_test_run(out, sizeof out, __VA_ARGS__)

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

static void write_file(const char *path, const char *data, size_t len) {
    char err[KD_ERR_LEN];
    if (kd_write_file_atomic(path, data, len, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
}

/* n characters of the source: a with 1/2, b 1/4, c 1/8, d 1/8 */
static void write_source(const char *path, size_t n, uint64_t seed) {
    char *text = kd_xmalloc(n);
    kd_rng_t rng;
    kd_rng_init(&rng, seed);
    for (size_t i = 0; i < n; i++) {
        uint32_t u = kd_rng_below(&rng, 8);
        text[i] = u < 4 ? 'a' : u < 6 ? 'b' : u < 7 ? 'c' : 'd';
    }
    write_file(path, text, n);
    free(text);
}

static double json_number(const char *text, const char *key) {
    char pat[128];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(text, pat);
    return p ? strtod(p + strlen(pat), NULL) : NAN;
}

int main(void) {
    tmp = kd_test_tmpdir("test_lm");
    const char *bin = getenv("KD_BIN_DIR");
    snprintf(kdist, sizeof kdist, "%s/kdist", bin ? bin : "../build/bin");
    write_source(tmp_path("source.txt"), 40000, 7);
    char recipe[4096];
    snprintf(recipe, sizeof recipe,
             "name: lm_tiny\n"
             "data: {format: text, dir: %s, files: [source.txt], tokenizer: bytes, "
             "val_fraction: 0.1, test_fraction: 0.1}\n"
             "student:\n  gpt: {layers: 1, width: 16, heads: 2, context: 32}\n"
             "optim: {name: adamw, lr: 1e-2, weight_decay: 0.01, clip_norm: 1.0}\n"
             "schedule: {name: cosine, warmup_steps: 10, min_lr: 1e-3}\n"
             "train: {epochs: 1, batch_size: 16, threads: 1}\n"
             "logging: {runs_dir: %s/runs}\n",
             tmp, tmp);
    write_file(tmp_path("lm.yaml"), recipe, strlen(recipe));

    /* train: the summary holds the language-model measures */
    double t0 = kd_now();
    CHECK(run("%s train %s", kdist, tmp_path("lm.yaml")) == 0);
    fprintf(stderr, "  kdist train: %.1f s\n%s", kd_now() - t0, out);
    CHECK(strstr(out, "bits per byte") != NULL && strstr(out, "tokens/s") != NULL);
    uint8_t *summary = NULL;
    size_t len;
    char err[KD_ERR_LEN];
    CHECK(kd_read_file(tmp_path("runs/lm_tiny/summary.json"), &summary, &len, err, sizeof err) ==
          0);
    if (summary) {
        double bpb = json_number((char *)summary, "val_bits_per_byte");
        double ppl = json_number((char *)summary, "val_perplexity");
        double loss = json_number((char *)summary, "val_loss");
        fprintf(stderr, "  validation: %.4f bits per byte (the source has %.2f), perplexity %.3f\n",
                bpb, ENTROPY_BITS, ppl);
        /* bytes tokenizer: one byte a token, so bits per byte = loss / ln 2; perplexity e^loss */
        CHECK(fabs(bpb - loss / M_LN2) < 1e-4 && fabs(ppl - exp(loss)) < 1e-3 * ppl);
        /* no model beats the entropy (up to the sampling noise of 4000 held-out bytes) */
        CHECK(bpb > ENTROPY_BITS - 0.05);
        /* and this one learnt the source: uniform over 4 letters is 2 bits, over bytes 8 */
        CHECK(bpb < ENTROPY_BITS + 0.15);
        CHECK(json_number((char *)summary, "tokens_per_sec") > 0);
    }
    free(summary);
    CHECK(kd_file_exists(tmp_path("runs/lm_tiny/config.json")));

    /* eval: the dumps have the shapes the issue gives */
    CHECK(run("%s eval %s/runs/lm_tiny --recipe %s --split val --dump-logits %s --dump-tokens %s "
              "data.val_windows=5",
              kdist, tmp, tmp_path("lm.yaml"), tmp_path("l.npy"), tmp_path("t.npy")) == 0);
    CHECK(strstr(out, "logits (5, 32, 257)") && strstr(out, "token windows (5, 33)") &&
          strstr(out, "perplexity"));
    uint8_t *npy = NULL;
    if (kd_read_file(tmp_path("l.npy"), &npy, &len, err, sizeof err) == 0)
        CHECK(len == 128 + 4 * 5 * 32 * 257 && strstr((char *)npy + 10, "(5, 32, 257)"));
    free(npy);
    npy = NULL;
    if (kd_read_file(tmp_path("t.npy"), &npy, &len, err, sizeof err) == 0)
        CHECK(len == 128 + 4 * 5 * 33 && strstr((char *)npy + 10, "'<i4'"));
    free(npy);

    /* sample: the same seed, the same text; another seed, another text */
    static char first[sizeof out], second[sizeof out];
    CHECK(run("%s sample %s/runs/lm_tiny --recipe %s --prompt abc --tokens 64 --seed 5", kdist, tmp,
              tmp_path("lm.yaml")) == 0);
    snprintf(first, sizeof first, "%s", out);
    CHECK(run("%s sample %s/runs/lm_tiny/student.safetensors --recipe %s --prompt abc --tokens 64 "
              "--seed 5",
              kdist, tmp, tmp_path("lm.yaml")) == 0);
    snprintf(second, sizeof second, "%s", out);
    CHECK(strcmp(first, second) == 0 && strncmp(first, "abc", 3) == 0 &&
          strlen(first) == 3 + 64 + 1);
    CHECK(run("%s sample %s/runs/lm_tiny --recipe %s --prompt abc --tokens 64 --seed 6", kdist, tmp,
              tmp_path("lm.yaml")) == 0);
    CHECK(strcmp(first, out) != 0);
    /* it learnt the letters: nearly everything sampled is one of them */
    int letters = 0;
    for (const char *p = first + 3; *p && *p != '\n'; p++) letters += *p >= 'a' && *p <= 'd';
    CHECK(letters >= 60);

    /* text the gpt2 tokenizer cannot read; the cluster; a missing file */
    char bad[256];
    memset(bad, 'x', sizeof bad);
    bad[100] = (char)0xff;
    write_file(tmp_path("bad.txt"), bad, sizeof bad);
    CHECK(run("%s train %s data.tokenizer=gpt2 data.files=bad.txt", kdist, tmp_path("lm.yaml")) ==
          1);
    CHECK(strstr(out, "bad.txt") && strstr(out, "byte offset 100"));
    CHECK(run("%s run %s", kdist, tmp_path("lm.yaml")) == 2);
    CHECK(strstr(out, "the cluster does not run language-model recipes yet") != NULL);
    CHECK(run("%s train %s data.files=nowhere.txt", kdist, tmp_path("lm.yaml")) == 1);
    CHECK(strstr(out, "nowhere.txt") != NULL);

    if (!kd_test_failures) {
        char cmd[1100];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", tmp);
    }
    return kd_test_done("test_lm");
}
