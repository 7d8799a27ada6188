/* kdist cache ls | verify | gc | export | import: the teacher-logit cache from the command line
 * (DESIGN §4). The work is done by common/kd_cache.c; this file parses arguments and prints.
 * Exit codes: 0 done, 1 failed (the message names the entry or file), 2 usage error. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kd_cache.h"
#include "kd_cli.h"
#include "kd_train.h"
#include "kd_util.h"

#define DEFAULT_DIR "cache"

static void usage(FILE *out) {
    fprintf(out,
            "usage: kdist cache <command> [--dir DIR] ...   (DIR defaults to '" DEFAULT_DIR "')\n"
            "\n"
            "  ls                         entries with encoding, size and coverage\n"
            "  verify [ENTRY]             check every written block of ENTRY (a name prefix)\n"
            "                             or of every entry; exit 1 when one is corrupt\n"
            "  gc ENTRY... | --all [--older-than DAYS]\n"
            "                             delete entries by name prefix, all of them, or those\n"
            "                             created more than DAYS ago\n"
            "  export ENTRY [--encoding E] --out FILE.npy\n"
            "                             decoded logits as float32 (N, C); the entry must be\n"
            "                             complete\n"
            "  import --data-fingerprint FP|--recipe RECIPE --label NAME --encoding E [--k K]\n"
            "         [--block-rows N] [--temperature T] FILE.npy\n"
            "  import ... --encoding topk<K> --vocab V --ids IDS.npy --logprobs LOGPROBS.npy\n"
            "                             logits computed elsewhere, as teacher 'import:NAME':\n"
            "                             float32 (N, C), or a language model's (windows,\n"
            "                             positions, vocabulary); or its top-k pairs, int ids and\n"
            "                             float32 log-probabilities (windows, positions, K); the\n"
            "                             fingerprint of the recipe's training split with\n"
            "                             --recipe\n"
            "\n"
            "ENTRY is <teacher_fp>-<data_fp>[/<encoding>] or a prefix of it; encodings are\n"
            "fp32, fp16, int8, topk<K> (e.g. topk16, or --encoding topk --k 16) and, for\n"
            "language models, sampled<K> (K draws per position at --temperature, default 1).\n");
}

/* A usage error: one line saying what is wrong, exit code 2. */
static int usage_error(const char *cmd, const char *msg) {
    fprintf(stderr, "kdist cache %s: %s (see kdist cache --help)\n", cmd, msg);
    return 2;
}

typedef struct {
    const char *dir, *encoding, *out, *data_fp, *label, *recipe, *ids, *logprobs;
    const char *temperature;
    long vocab;
    long k, block_rows;
    double older_than_days;
    bool all;
    const char *args[64];
    int n_args;
} cache_opts_t;

/* The value of option argv[*i] (consumed); NULL with a message when it is missing. */
static const char *option_value(const char *cmd, int argc, char **argv, int *i) {
    if (*i + 1 < argc) return argv[++*i];
    fprintf(stderr, "kdist cache %s: %s needs a value\n", cmd, argv[*i]);
    return NULL;
}

static int parse_number(const char *cmd, const char *opt, const char *v, long *out) {
    if (v && kd_parse_long(v, out) == 0 && *out >= 0) return 0;
    fprintf(stderr, "kdist cache %s: %s needs a non-negative integer, not '%s'\n", cmd, opt,
            v ? v : "");
    return -1;
}

/* Parses argv; `allowed` lists the options this command takes. 0, or 2 (usage error). */
static int parse_opts(const char *cmd, int argc, char **argv, const char *allowed,
                      cache_opts_t *o) {
    memset(o, 0, sizeof *o);
    o->dir = DEFAULT_DIR;
    o->older_than_days = -1;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        if (a[0] != '-' || strcmp(a, "-") == 0) {
            if (o->n_args == (int)(sizeof o->args / sizeof o->args[0])) {
                fprintf(stderr, "kdist cache %s: too many arguments\n", cmd);
                return 2;
            }
            o->args[o->n_args++] = a;
            continue;
        }
        char word[40];
        snprintf(word, sizeof word, " %s ", a);
        if (!strstr(allowed, word)) {
            char msg[128];
            snprintf(msg, sizeof msg, "unknown option '%.60s'", a);
            return usage_error(cmd, msg);
        }
        if (strcmp(a, "--all") == 0) {
            o->all = true;
            continue;
        }
        if (!(v = option_value(cmd, argc, argv, &i))) return 2;
        if (strcmp(a, "--dir") == 0) o->dir = v;
        if (strcmp(a, "--encoding") == 0) o->encoding = v;
        if (strcmp(a, "--out") == 0) o->out = v;
        if (strcmp(a, "--data-fingerprint") == 0) o->data_fp = v;
        if (strcmp(a, "--label") == 0) o->label = v;
        if (strcmp(a, "--recipe") == 0) o->recipe = v;
        if (strcmp(a, "--ids") == 0) o->ids = v;
        if (strcmp(a, "--logprobs") == 0) o->logprobs = v;
        if (strcmp(a, "--temperature") == 0) o->temperature = v;
        if (strcmp(a, "--vocab") == 0 && parse_number(cmd, a, v, &o->vocab) != 0) return 2;
        if (strcmp(a, "--k") == 0 && parse_number(cmd, a, v, &o->k) != 0) return 2;
        if (strcmp(a, "--block-rows") == 0 && parse_number(cmd, a, v, &o->block_rows) != 0)
            return 2;
        if (strcmp(a, "--older-than") == 0 &&
            (kd_parse_double(v, &o->older_than_days) != 0 || !(o->older_than_days >= 0))) {
            fprintf(stderr, "kdist cache %s: --older-than needs a number of days, not '%s'\n", cmd,
                    v);
            return 2;
        }
    }
    return 0;
}

static void format_bytes(uint64_t n, char *out, size_t outlen) {
    const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)n;
    int u = 0;
    for (; v >= 1024 && u < 4; u++) v /= 1024;
    snprintf(out, outlen, u ? "%.1f %s" : "%.0f %s", v, units[u]);
}

static void format_time(double t, char *out, size_t outlen) {
    time_t s = (time_t)t;
    struct tm tm;
    localtime_r(&s, &tm);
    strftime(out, outlen, "%Y-%m-%d %H:%M", &tm);
}

/* The entry's directory name ("fp16", "topk16") matches an --encoding filter: exactly, or
 * "topk" for any topk<K>. */
static bool encoding_matches(const char *name, const char *filter) {
    const char *sub = strchr(name, '/');
    sub = sub ? sub + 1 : name;
    if (strcmp(sub, filter) == 0) return true;
    return strcmp(filter, "topk") == 0 && strncmp(sub, "topk", 4) == 0;
}

/* Entries whose name starts with prefix (NULL: all) and match the encoding filter (may be
 * NULL). Caller frees *out. 0, or 1 with a message printed. */
static int select_entries(const char *cmd, const char *dir, const char *prefix,
                          const char *encoding, kd_cache_entry_info_t **out, size_t *n) {
    char err[KD_ERR_LEN];
    size_t total;
    if (kd_cache_list(dir, out, &total, err, sizeof err) != 0) {
        fprintf(stderr, "kdist cache %s: %s\n", cmd, err);
        return 1;
    }
    *n = 0;
    for (size_t i = 0; i < total; i++) {
        kd_cache_entry_info_t *e = &(*out)[i];
        if (prefix && strncmp(e->name, prefix, strlen(prefix)) != 0) continue;
        if (encoding && !encoding_matches(e->name, encoding)) continue;
        (*out)[(*n)++] = *e;
    }
    return 0;
}

/* ---- ls ------------------------------------------------------------------------------------ */

static int cache_ls(int argc, char **argv) {
    cache_opts_t o;
    if (parse_opts("ls", argc, argv, " --dir ", &o) != 0) return 2;
    if (o.n_args) return usage_error("ls", "takes no arguments besides --dir");
    kd_cache_entry_info_t *list;
    size_t n;
    if (select_entries("ls", o.dir, NULL, NULL, &list, &n) != 0) return 1;
    if (n == 0) printf("no cache entries in %s\n", o.dir);
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const kd_cache_entry_info_t *e = &list[i];
        char size[32], created[32];
        format_bytes(e->disk_bytes, size, sizeof size);
        format_time(e->created, created, sizeof created);
        total += e->disk_bytes;
        if (!e->ok) {
            printf("%s\n    BROKEN: %s\n", e->name, e->error);
            continue;
        }
        double pct = e->blocks ? 100.0 * (double)e->blocks_written / (double)e->blocks : 0.0;
        /* a language model's entry has one row per position (token), one block per window */
        const bool lm = strstr(e->key.data_desc, KD_CACHE_PREPROCESSING_TOKENS) != NULL;
        printf("%s\n    %zu %s x %d classes, %s (%zu bytes a %s), %zu/%zu %s (%.1f%%), %s on "
               "disk, created %s\n    teacher: %s\n",
               e->name, e->key.n_samples, lm ? "tokens" : "samples", e->key.n_classes,
               strchr(e->name, '/') + 1,
               kd_cache_record_bytes(e->key.encoding, e->key.n_classes, e->key.k),
               lm ? "token" : "sample", e->blocks_written, e->blocks, lm ? "windows" : "blocks",
               pct, size, created, e->key.teacher_desc);
        if (e->key.data_desc[0]) printf("    data: %s\n", e->key.data_desc);
    }
    if (n) {
        char size[32];
        format_bytes(total, size, sizeof size);
        printf("%zu entr%s, %s on disk in %s\n", n, n == 1 ? "y" : "ies", size, o.dir);
    }
    free(list);
    return 0;
}

/* ---- verify -------------------------------------------------------------------------------- */

static void print_bad(void *user, size_t block, const char *msg) {
    (void)block;
    ++*(size_t *)user;
    printf("    CORRUPT %s\n", msg);
}

static int cache_verify(int argc, char **argv) {
    cache_opts_t o;
    if (parse_opts("verify", argc, argv, " --dir ", &o) != 0) return 2;
    if (o.n_args > 1) return usage_error("verify", "takes at most one ENTRY");
    const char *prefix = o.n_args ? o.args[0] : NULL;
    kd_cache_entry_info_t *list;
    size_t n, bad_entries = 0;
    if (select_entries("verify", o.dir, prefix, NULL, &list, &n) != 0) return 1;
    if (n == 0 && prefix) {
        fprintf(stderr, "kdist cache verify: no entry in %s matches '%s'\n", o.dir, prefix);
        free(list);
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        char err[KD_ERR_LEN];
        kd_cache_t *c = kd_cache_open_entry(list[i].path, err, sizeof err);
        kd_cache_verify_t v;
        size_t printed = 0;
        printf("%s\n", list[i].name);
        if (!c || kd_cache_verify(c, &v, print_bad, &printed, err, sizeof err) != 0) {
            printf("    FAILED: %s\n", err);
            bad_entries++;
        } else {
            printf("    %zu blocks: %zu ok, %zu missing, %zu corrupt%s\n", kd_cache_blocks(c), v.ok,
                   v.missing, v.corrupt,
                   v.corrupt ? " (a teacher node recomputes corrupt blocks)" : "");
            if (v.corrupt) bad_entries++;
        }
        kd_cache_close(&c);
    }
    free(list);
    if (n == 0) printf("no cache entries in %s\n", o.dir);
    if (bad_entries)
        fprintf(stderr, "kdist cache verify: %zu of %zu entries have problems\n", bad_entries, n);
    return bad_entries ? 1 : 0;
}

/* ---- gc ------------------------------------------------------------------------------------ */

static void print_removed(void *user, const char *name) {
    printf("removed %s/%s\n", (const char *)user, name);
}

static int cache_gc(int argc, char **argv) {
    cache_opts_t o;
    if (parse_opts("gc", argc, argv, " --dir --all --older-than ", &o) != 0) return 2;
    if (o.all && o.n_args) return usage_error("gc", "give ENTRY prefixes or --all, not both");
    if (!o.all && !o.n_args && o.older_than_days < 0)
        return usage_error("gc", "which entries? give ENTRY prefixes, --all or --older-than DAYS");
    char err[KD_ERR_LEN];
    size_t removed = 0, total = 0;
    int rc = 0;
    for (int i = 0; i < (o.n_args ? o.n_args : 1) && rc == 0; i++) {
        const char *prefix = o.n_args ? o.args[i] : NULL;
        rc = kd_cache_gc(o.dir, prefix, o.older_than_days, print_removed, (void *)o.dir, &removed,
                         err, sizeof err);
        if (rc != 0) fprintf(stderr, "kdist cache gc: %s\n", err);
        if (rc == 0 && prefix && removed == 0 && o.older_than_days < 0) {
            fprintf(stderr, "kdist cache gc: no entry in %s matches '%s'\n", o.dir, prefix);
            rc = -1;
        }
        total += removed;
    }
    printf("%zu entr%s removed\n", total, total == 1 ? "y" : "ies");
    return rc ? 1 : 0;
}

/* ---- export -------------------------------------------------------------------------------- */

static int cache_export(int argc, char **argv) {
    cache_opts_t o;
    kd_cache_encoding_t enc;
    int k;
    if (parse_opts("export", argc, argv, " --dir --encoding --out ", &o) != 0) return 2;
    if (o.n_args != 1) return usage_error("export", "needs exactly one ENTRY");
    if (!o.out) return usage_error("export", "needs --out FILE.npy");
    if (o.encoding && kd_cache_encoding_parse(o.encoding, &enc, &k) != 0) {
        fprintf(stderr, "kdist cache export: unknown encoding '%s'\n", o.encoding);
        return 2;
    }
    kd_cache_entry_info_t *list;
    size_t n;
    if (select_entries("export", o.dir, o.args[0], o.encoding, &list, &n) != 0) return 1;
    int rc = 1;
    char err[KD_ERR_LEN];
    if (n != 1) {
        fprintf(stderr, "kdist cache export: %s entry in %s matches '%s'%s%s%s\n",
                n ? "more than one" : "no", o.dir, o.args[0], o.encoding ? " with encoding " : "",
                o.encoding ? o.encoding : "", n ? "; give a longer prefix or --encoding:" : "");
        for (size_t i = 0; i < n; i++) fprintf(stderr, "    %s\n", list[i].name);
        free(list);
        return 1;
    }
    kd_cache_t *c = kd_cache_open_entry(list[0].path, err, sizeof err);
    if (c && kd_cache_export_npy(c, o.out, err, sizeof err) == 0) {
        printf("exported %s: logits (%zu, %d) float32 to %s\n", list[0].name,
               kd_cache_key(c)->n_samples, kd_cache_key(c)->n_classes, o.out);
        rc = 0;
    } else {
        fprintf(stderr, "kdist cache export: %s\n", err);
    }
    kd_cache_close(&c);
    free(list);
    return rc;
}

/* ---- import -------------------------------------------------------------------------------- */

/* The data fingerprint of a recipe's training split, as its teacher nodes key the cache. */
static int recipe_data_fingerprint(const char *path, char *fp, char *err, size_t errlen) {
    kd_recipe_t *r = kd_xmalloc(sizeof *r);
    kd_splits_t d = {0};
    int rc = -1;
    if (kd_recipe_load(path, NULL, 0, r, err, errlen) == 0 &&
        kd_splits_load(r, &d, err, errlen) == 0) {
        kd_cache_fingerprint_data(
            d.train,
            d.train->tokens ? KD_CACHE_PREPROCESSING_TOKENS : KD_CACHE_PREPROCESSING_PIXELS, fp);
        rc = 0;
    }
    kd_splits_destroy(&d);
    free(r);
    return rc;
}

/* A language model's import (a 3-D FILE.npy, or --ids with --logprobs). */
static int import_lm(const cache_opts_t *o, kd_cache_encoding_t enc, int k, const char *data_fp,
                     char *name, size_t name_len, char *err, size_t errlen) {
    kd_npy_array_t dense = {0}, ids = {0}, lp = {0};
    kd_cache_lm_import_t in = {.dense_path = o->n_args ? o->args[0] : NULL,
                               .ids_path = o->ids,
                               .logprobs_path = o->logprobs,
                               .vocab = (int)o->vocab,
                               .encoding = enc,
                               .k = k,
                               .sample_temperature = 1.0f,
                               .data_fp = data_fp,
                               .label = o->label};
    double t = 1.0;
    if (o->temperature && (kd_parse_double(o->temperature, &t) != 0 || !(t > 0 && t <= 100)))
        return kd_err(err, errlen, "--temperature needs a number in (0, 100], not '%s'",
                      o->temperature);
    in.sample_temperature = (float)t;
    int rc = -1;
    if (o->ids) {
        if (kd_npy_read(o->ids, KD_NPY_I32 | KD_NPY_I64, &ids, err, errlen) == 0 &&
            kd_npy_read(o->logprobs, KD_NPY_F32, &lp, err, errlen) == 0) {
            in.ids = &ids;
            in.logprobs = &lp;
            rc = kd_cache_import_lm(o->dir, &in, name, name_len, err, errlen);
        }
    } else if (kd_npy_read(o->args[0], KD_NPY_F32, &dense, err, errlen) == 0) {
        in.dense = &dense;
        rc = kd_cache_import_lm(o->dir, &in, name, name_len, err, errlen);
    }
    free(dense.data);
    free(ids.data);
    free(lp.data);
    return rc;
}

/* The number of dimensions of an .npy file's array (its header only), or -1. */
static int npy_ndim(const char *path) {
    FILE *f = fopen(path, "rb");
    char head[512] = "";
    size_t n = f ? fread(head, 1, sizeof head - 1, f) : 0;
    if (f) fclose(f);
    head[n] = 0;
    const char *p = n > 10 ? strstr(head + 10, "'shape': (") : NULL;
    if (!p) return -1;
    int commas = 0;
    for (p += 10; *p && *p != ')'; p++) commas += *p == ',';
    return p[-1] == ',' ? commas : commas + 1;
}

static int cache_import(int argc, char **argv) {
    cache_opts_t o;
    if (parse_opts("import", argc, argv,
                   " --dir --data-fingerprint --recipe --label --encoding --k --block-rows --ids "
                   "--logprobs --vocab --temperature ",
                   &o) != 0)
        return 2;
    const bool pairs = o.ids || o.logprobs;
    if (pairs && (!o.ids || !o.logprobs || o.n_args != 0 || o.vocab < 1))
        return usage_error("import", "top-k pairs need --ids, --logprobs and --vocab, no FILE");
    if (!pairs && o.n_args != 1) return usage_error("import", "needs exactly one FILE.npy");
    if (!o.data_fp == !o.recipe)
        return usage_error("import", "needs --data-fingerprint FP or --recipe RECIPE");
    if (!o.label) return usage_error("import", "needs --label NAME");
    if (!o.encoding)
        return usage_error("import", "needs --encoding fp32|fp16|int8|topk<K>|sampled<K>");
    kd_cache_encoding_t enc;
    int k;
    if (kd_cache_encoding_parse(o.encoding, &enc, &k) != 0) {
        fprintf(stderr, "kdist cache import: unknown encoding '%s'\n", o.encoding);
        return 2;
    }
    if (o.k && k && o.k != k) {
        fprintf(stderr, "kdist cache import: --encoding %s and --k %ld disagree\n", o.encoding,
                o.k);
        return 2;
    }
    if (o.k > (1 << 26)) {
        fprintf(stderr, "kdist cache import: --k %ld is too large\n", o.k);
        return 2;
    }
    if (!k) k = (int)o.k;
    if ((enc == KD_ENC_TOPK || enc == KD_ENC_SAMPLED) && k == 0 && !pairs) {
        fprintf(stderr, "kdist cache import: %s needs k (--encoding %s16 or --k 16)\n",
                kd_cache_encoding_name(enc), kd_cache_encoding_name(enc));
        return 2;
    }
    char err[KD_ERR_LEN], name[KD_CACHE_NAME_MAX], teacher_fp[KD_CACHE_FP_HEX + 1],
        data_fp[KD_CACHE_FP_HEX + 1];
    if (o.recipe && recipe_data_fingerprint(o.recipe, data_fp, err, sizeof err) != 0) {
        fprintf(stderr, "kdist cache import: --recipe %s: %s\n", o.recipe, err);
        return 1;
    }
    const char *fp = o.data_fp ? o.data_fp : data_fp;
    int rc = pairs || npy_ndim(o.args[0]) == 3
                 ? import_lm(&o, enc, k, fp, name, sizeof name, err, sizeof err)
                 : kd_cache_import_npy(o.dir, o.args[0], fp, o.label, enc, k, (size_t)o.block_rows,
                                       name, sizeof name, err, sizeof err);
    if (rc != 0) {
        fprintf(stderr, "kdist cache import: %s\n", err);
        return 1;
    }
    kd_cache_fingerprint_import(o.label, teacher_fp);
    printf("imported %s as %s/%s\nteacher 'import:%s' has fingerprint %s\n",
           pairs ? o.ids : o.args[0], o.dir, name, o.label, teacher_fp);
    return 0;
}

int kd_cmd_cache(int argc, char **argv) {
    if (argc < 1 || strcmp(argv[0], "-h") == 0 || strcmp(argv[0], "--help") == 0) {
        usage(argc < 1 ? stderr : stdout);
        return argc < 1 ? 2 : 0;
    }
    const char *cmd = argv[0];
    if (strcmp(cmd, "ls") == 0) return cache_ls(argc - 1, argv + 1);
    if (strcmp(cmd, "verify") == 0) return cache_verify(argc - 1, argv + 1);
    if (strcmp(cmd, "gc") == 0) return cache_gc(argc - 1, argv + 1);
    if (strcmp(cmd, "export") == 0) return cache_export(argc - 1, argv + 1);
    if (strcmp(cmd, "import") == 0) return cache_import(argc - 1, argv + 1);
    fprintf(stderr, "kdist cache: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
