/* kdist data prepare: text files tokenized once into llm.c token shards, so a recipe with
 * data.format tokens reads them without tokenizing again (and other tools, llm.c among them,
 * read the same files). One shard per input file: a tokens recipe joins its files with
 * end-of-text between them, exactly as a text recipe joins the texts, so both give the same
 * stream and the same windows. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_cli.h"
#include "kd_recipe.h"
#include "kd_tokenizer.h"
#include "kd_tokens.h"
#include "kd_util.h"

#define DATA_USAGE                                                                                 \
    "usage: kdist data prepare --tokenizer bytes|gpt2 [--tokenizer-dir DIR] FILE... --out DIR\n"   \
    "        tokenizes each UTF-8 text FILE into DIR/<name>.bin (llm.c's shard format: a\n"        \
    "        256-int32 header with magic 20240520, then uint16 ids) and prints the recipe lines\n" \
    "        that read them (data.format: tokens)"

/* DIR/<base of path without its extension>.bin */
static void shard_path(const char *dir, const char *path, char *out, size_t outlen) {
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    const char *dot = strrchr(base, '.');
    int stem = dot && dot != base ? (int)(dot - base) : (int)strlen(base);
    snprintf(out, outlen, "%s/%.*s.bin", dir, stem, base);
}

static int prepare(const char *tokenizer, const char *tokenizer_dir, const char *const *files,
                   int n_files, const char *out_dir) {
    char err[KD_ERR_LEN];
    char shards[KD_MAX_DATA_FILES][KD_PATH_MAX];
    for (int f = 0; f < n_files; f++) {
        shard_path(out_dir, files[f], shards[f], sizeof shards[f]);
        for (int g = 0; g < f; g++)
            if (strcmp(shards[f], shards[g]) == 0) {
                fprintf(stderr, "kdist data prepare: %s and %s would both be written to %s\n",
                        files[g], files[f], shards[f]);
                return 2;
            }
    }
    kd_tokenizer_t *tok = NULL;
    if (kd_tokenizer_open(tokenizer, tokenizer_dir, &tok, err, sizeof err) != 0 ||
        kd_mkdirs(out_dir, err, sizeof err) != 0) {
        fprintf(stderr, "kdist data prepare: %s\n", err);
        kd_tokenizer_destroy(&tok);
        return 1;
    }
    int rc = 0;
    size_t total = 0;
    for (int f = 0; f < n_files && rc == 0; f++) {
        uint8_t *text = NULL;
        size_t len = 0, n = 0, cap = 0;
        uint32_t *ids = NULL;
        char why[KD_ERR_LEN / 2];
        if (kd_read_file(files[f], &text, &len, err, sizeof err) != 0)
            rc = 1;
        else if (kd_tokenizer_encode(tok, (const char *)text, len, &ids, &n, &cap, why,
                                     sizeof why) != 0) {
            snprintf(err, sizeof err, "%s: %s (--tokenizer %s needs UTF-8 text)", files[f], why,
                     tokenizer);
            rc = 1;
        } else if (n == 0) {
            snprintf(err, sizeof err, "%s: holds no text", files[f]);
            rc = 1;
        } else if (kd_tokens_write_llmc(shards[f], ids, n, err, sizeof err) != 0)
            rc = 1;
        else {
            fprintf(stderr,
                    "kdist data prepare: %s: %zu bytes -> %zu tokens (%.3f bytes/token) -> %s\n",
                    files[f], len, n, (double)len / (double)n, shards[f]);
            total += n;
        }
        free(text);
        free(ids);
    }
    kd_tokenizer_destroy(&tok);
    if (rc != 0) {
        fprintf(stderr, "kdist data prepare: %s\n", err);
        return rc;
    }
    /* the recipe lines, shard names relative to data.dir */
    printf("# %zu tokens in %d shard%s; a recipe reads them with\n", total, n_files,
           n_files == 1 ? "" : "s");
    printf("data:\n  format: tokens\n  tokenizer: %s\n  dir: %s\n  files: [", tokenizer, out_dir);
    for (int f = 0; f < n_files; f++) printf("%s%s", f ? ", " : "", strrchr(shards[f], '/') + 1);
    printf("]\n");
    return 0;
}

int kd_cmd_data(int argc, char **argv) {
    if (argc < 1 || strcmp(argv[0], "prepare") != 0) {
        bool help = argc >= 1 && (strcmp(argv[0], "--help") == 0 || strcmp(argv[0], "-h") == 0);
        fprintf(help ? stdout : stderr, "%s\n", DATA_USAGE);
        return help ? 0 : 2;
    }
    const char *tokenizer = NULL, *tokenizer_dir = NULL, *out_dir = NULL;
    const char *files[KD_MAX_DATA_FILES];
    int n_files = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has = i + 1 < argc;
        if (strcmp(a, "--tokenizer") == 0 && has)
            tokenizer = argv[++i];
        else if (strcmp(a, "--tokenizer-dir") == 0 && has)
            tokenizer_dir = argv[++i];
        else if (strcmp(a, "--out") == 0 && has)
            out_dir = argv[++i];
        else if (a[0] == '-') {
            fprintf(stderr, "kdist data prepare: unknown or incomplete option '%s'\n%s\n", a,
                    DATA_USAGE);
            return 2;
        } else if (n_files == KD_MAX_DATA_FILES) {
            fprintf(stderr, "kdist data prepare: more than %d files (data.files holds %d)\n",
                    KD_MAX_DATA_FILES, KD_MAX_DATA_FILES);
            return 2;
        } else
            files[n_files++] = a;
    }
    if (!tokenizer || !out_dir || n_files == 0) {
        fprintf(stderr, "kdist data prepare: %s\n%s\n",
                !tokenizer ? "--tokenizer is missing"
                : !out_dir ? "--out is missing"
                           : "no input files",
                DATA_USAGE);
        return 2;
    }
    return prepare(tokenizer, tokenizer_dir, files, n_files, out_dir);
}
