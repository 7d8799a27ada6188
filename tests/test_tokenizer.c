/* Tests of kd_tokenizer: the bytes tokenizer; gpt2 id for id against the reference encoder (npm
 * gpt-3-encoder's own Encoder.js, run by node through tests/gpt2_reference.js) on a crafted text,
 * a random one and the whole King James Bible, with decode(encode(x)) == x; a few ids by hand;
 * a tiny vocabulary whose merges are worked out by hand; malformed files and text.
 * node, the package and `bible` are installed by scripts/install-deps.sh; without them the test
 * fails, saying so. */
#include "kd_tokenizer.h"
#include "kd_util.h"

#include "kd_test.h"

#include <stdint.h>
#include <sys/stat.h>

static char tmp[1024];
static char gpt2_dir[KD_PATH_MAX];

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

static void write_file(const char *path, const void *data, size_t len) {
    char err[KD_ERR_LEN];
    if (kd_write_file_atomic(path, data, len, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
}

static void write_str(const char *path, const char *s) {
    write_file(path, s, strlen(s));
}

typedef struct {
    uint32_t *v;
    size_t n, cap;
} ids_t;

static void ids_free(ids_t *a) {
    free(a->v);
    memset(a, 0, sizeof *a);
}

/* ---- bytes ----------------------------------------------------------------------------------- */

static void test_bytes(void) {
    char err[KD_ERR_LEN] = "";
    kd_tokenizer_t *t = NULL;
    CHECK(kd_tokenizer_open("bytes", NULL, &t, err, sizeof err) == 0);
    if (!t) return;
    CHECK(strcmp(kd_tokenizer_name(t), "bytes") == 0);
    CHECK(kd_tokenizer_vocab(t) == 257);
    CHECK(kd_tokenizer_eot(t) == 256);

    /* every byte value, then pseudo-random bytes (invalid UTF-8 included: bytes takes anything) */
    size_t len = 256 + 5000;
    unsigned char *text = malloc(len);
    uint32_t x = 12345;
    for (size_t i = 0; i < len; i++) {
        x = x * 1103515245u + 12345u;
        text[i] = i < 256 ? (unsigned char)i : (unsigned char)(x >> 24);
    }
    ids_t a = {0};
    CHECK(kd_tokenizer_encode(t, (const char *)text, len, &a.v, &a.n, &a.cap, err, sizeof err) ==
          0);
    CHECK(a.n == len);
    bool same = a.n == len;
    for (size_t i = 0; same && i < len; i++) same = a.v[i] == text[i];
    CHECK(same);
    char *back = malloc(len);
    size_t blen = 0;
    CHECK(kd_tokenizer_decode(t, a.v, a.n, back, len, &blen, err, sizeof err) == 0);
    CHECK(blen == len && memcmp(back, text, len) == 0);
    /* appends */
    CHECK(kd_tokenizer_encode(t, "ab", 2, &a.v, &a.n, &a.cap, err, sizeof err) == 0);
    CHECK(a.n == len + 2 && a.v[len] == 'a' && a.v[len + 1] == 'b');

    /* end-of-text decodes as its GPT-2 spelling; measuring with a NULL buffer; a short buffer */
    uint32_t ids[3] = {'x', 256, 'y'};
    CHECK(kd_tokenizer_decode(t, ids, 3, NULL, 0, &blen, err, sizeof err) == 0);
    CHECK(blen == 2 + strlen(KD_TOKENIZER_EOT_TEXT));
    char small[4] = "";
    CHECK(kd_tokenizer_decode(t, ids, 3, small, sizeof small, &blen, err, sizeof err) == 0);
    CHECK(blen == 15 && memcmp(small, "x<|e", 4) == 0);
    uint32_t bad[2] = {'a', 257};
    CHECK(kd_tokenizer_decode(t, bad, 2, back, len, &blen, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "257");

    char fp[KD_TOKENIZER_FP_HEX + 1];
    kd_tokenizer_fingerprint(t, fp);
    CHECK(strlen(fp) == KD_TOKENIZER_FP_HEX);
    free(back);
    free(text);
    ids_free(&a);
    kd_tokenizer_destroy(&t);
    kd_tokenizer_destroy(&t); /* NULL-safe */
    CHECK(t == NULL);

    CHECK(kd_tokenizer_open("sentencepiece", NULL, &t, err, sizeof err) == -1);
    CHECK(t == NULL);
    CHECK_ERR_HAS(err, "sentencepiece");
}

/* ---- gpt2 against the reference -------------------------------------------------------------- */

static bool have_reference(void) {
    bool ok = true;
    char p[KD_PATH_MAX + 32];
    if (system("command -v node >/dev/null 2>&1") != 0) {
        fprintf(stderr, "test_tokenizer: node not found: run scripts/install-deps.sh\n");
        ok = false;
    }
    const char *files[] = {"Encoder.js", "encoder.json", "vocab.bpe"};
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s/%s", gpt2_dir, files[i]);
        if (!kd_file_exists(p)) {
            fprintf(stderr, "test_tokenizer: %s missing: run scripts/install-deps.sh\n", p);
            ok = false;
        }
    }
    if (system("command -v bible >/dev/null 2>&1") != 0) {
        fprintf(stderr, "test_tokenizer: `bible` (bible-kjv) not found: run "
                        "scripts/install-deps.sh\n");
        ok = false;
    }
    return ok;
}

/* The reference's ids of a file (mode: "--whole", "--chunk=N" or ""); -1 when node fails. */
static int reference_ids(const char *path, const char *mode, ids_t *out, double *secs) {
    char cmd[3 * KD_PATH_MAX];
    snprintf(cmd, sizeof cmd, "node gpt2_reference.js '%s' '%s' %s", gpt2_dir, path, mode);
    double t0 = kd_now();
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    char line[64];
    int rc = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        long v;
        if (kd_parse_long(line, &v) != 0 || v < 0 || v > UINT32_MAX) {
            fprintf(stderr, "reference printed \"%s\"\n", line);
            rc = -1;
            continue;
        }
        if (out->n == out->cap) {
            out->cap = out->cap ? 2 * out->cap : 4096;
            out->v = realloc(out->v, out->cap * sizeof *out->v);
        }
        out->v[out->n++] = (uint32_t)v;
    }
    int st = pclose(f);
    if (secs) *secs = kd_now() - t0;
    if (st != 0) {
        fprintf(stderr, "`%s` failed (status %d)\n", cmd, st);
        rc = -1;
    }
    return rc;
}

static bool same_ids(const char *what, const ids_t *c, const ids_t *js) {
    if (c->n != js->n)
        fprintf(stderr, "%s: %zu ids from C, %zu from the reference\n", what, c->n, js->n);
    size_t m = c->n < js->n ? c->n : js->n;
    for (size_t i = 0; i < m; i++) {
        if (c->v[i] != js->v[i]) {
            fprintf(stderr, "%s: first difference at id %zu: C %u, reference %u\n", what, i,
                    (unsigned)c->v[i], (unsigned)js->v[i]);
            return false;
        }
    }
    return c->n == js->n;
}

/* Encodes the file with kd and with the reference (each given mode), compares, round-trips. */
static void compare_file(kd_tokenizer_t *t, const char *what, const char *path,
                         const char *const *modes, int n_modes) {
    char err[KD_ERR_LEN] = "";
    uint8_t *text = NULL;
    size_t len = 0;
    if (kd_read_file(path, &text, &len, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        CHECK(0);
        return;
    }
    ids_t c = {0};
    double t0 = kd_now();
    int rc = kd_tokenizer_encode(t, (const char *)text, len, &c.v, &c.n, &c.cap, err, sizeof err);
    double secs = kd_now() - t0;
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "%s: %s\n", what, err);
    fprintf(stderr, "%s: %zu bytes, %zu ids; kd encodes in %.3f s (%.1f MB/s)\n", what, len, c.n,
            secs, (double)len / 1e6 / (secs > 0 ? secs : 1e-9));

    /* The cache gives what the BPE gave: encode again with every word cached. */
    ids_t again = {0};
    CHECK(kd_tokenizer_encode(t, (const char *)text, len, &again.v, &again.n, &again.cap, err,
                              sizeof err) == 0);
    CHECK(same_ids(what, &again, &c));

    for (int m = 0; m < n_modes; m++) {
        ids_t js = {0};
        double js_secs = 0;
        CHECK(reference_ids(path, modes[m], &js, &js_secs) == 0);
        fprintf(stderr, "%s: the reference (%s) takes %.1f s\n", what,
                *modes[m] ? modes[m] : "chunks", js_secs);
        CHECK(same_ids(what, &c, &js));
        ids_free(&js);
    }

    size_t blen = 0;
    CHECK(kd_tokenizer_decode(t, c.v, c.n, NULL, 0, &blen, err, sizeof err) == 0);
    CHECK(blen == len);
    char *back = malloc(blen + 1);
    CHECK(kd_tokenizer_decode(t, c.v, c.n, back, blen, &blen, err, sizeof err) == 0);
    CHECK(blen == len && memcmp(back, text, len) == 0);
    free(back);
    ids_free(&c);
    ids_free(&again);
    free(text);
}

/* Unicode, whitespace runs, contractions, numbers and punctuation; the last line ends in spaces
 * with no newline. */
static const char crafted[] =
    "Hello world! It's a test: we're here, they've gone, I'm sure you'll see, he'd know.\n"
    "IT'S LOUD, WE'RE HERE, YOU'LL SEE, I'M SURE: 'S 'T 'RE 'VE 'M 'LL 'D are not special.\n"
    "''s ' s x'sy rock'n'roll 'tis 'twas dogs' bones \"'quoted'\" o'clock 'll'd're\n"
    "caf\xc3\xa9 na\xc3\xafve r\xc3\xa9sum\xc3\xa9 \xc3\x85ngstr\xc3\xb6m S\xc3\xa3o Z\xc3\xbcrich "
    "stra\xc3\x9f"
    "e \xc5\x93uvre\n"
    "decomposed: cafe\xcc\x81 a\xcc\x8a n\xcc\x83 e\xcc\x81\xcc\x82 \xcc\x81"
    "alone\n"
    "\xce\x95\xce\xbb\xce\xbb\xce\xb7\xce\xbd\xce\xb9\xce\xba\xce\xac "
    "\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82 \xd0\xbc\xd0\xb8\xd1\x80 "
    "\xd9\x85\xd8\xb1\xd8\xad\xd8\xa8\xd8\xa7 \xd7\xa9\xd7\x9c\xd7\x95\xd7\x9d "
    "\xe0\xa4\xa8\xe0\xa4\xae\xe0\xa4\xb8\xe0\xa5\x8d\xe0\xa4\xa4\xe0\xa5\x87\n"
    "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xae\xe3\x83\x86\xe3\x82\xad\xe3\x82\xb9\xe3\x83"
    "\x88\xe3\x80\x81\xe4\xb8\xad\xe6\x96\x87\xe5\xad\x97\xe7\xac\xa6\xe3\x80\x82"
    "\xed\x95\x9c\xea\xb5\xad\xec\x96\xb4\n"
    "emoji \xf0\x9f\x98\x80\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd \xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f"
    "\x91\xa9\xe2\x80\x8d\xf0\x9f\x91\xa7 \xf0\x9f\x87\xab\xf0\x9f\x87\xb7 x\xf0\x9f\x98\x80y\n"
    "spaces: a  b   c    d     e\n"
    "\ttab\t\ttabs \t mixed\t \n"
    "blank lines\n\n\nthen\r\nCRLF\r\n\r\nand \v vertical \f feed\n"
    "nbsp:\xc2\xa0x \xc2\xa0y \xc2\xa0\xc2\xa0z a\xc2\xa0 b ideographic\xe3\x80\x80space "
    "\xe3\x80\x80\xe5\x85\xa8\n"
    "line\xe2\x80\xa8separator para\xe2\x80\xa9sep nel\xc2\x85here zwsp\xe2\x80\x8bhere "
    "bom\xef\xbb\xbfmid en\xe2\x80\x82space thin\xe2\x80\x89space\n"
    "numbers 0 7 42 123 4567 1234567890 3.14159 1,000,000 -12 +3e10 0x1F "
    "\xd9\xa1\xd9\xa2\xd9\xa3 \xc2\xb2\xc2\xb3 \xc2\xbd \xe2\x85\xab abc123def 12abc\n"
    "punct!!! ??? ... --- (parens) [brackets] {braces} @#$%^&*_=+|\\/~` \xe2\x80\x94 "
    "\xe2\x80\xa6 \xc2\xab\xc2\xbb \xe2\x80\x9cquotes\xe2\x80\x9d\n"
    "json {\"a\":[1,2],\"b\":\"c\",\"d\":{\"e\":null}} \"],\" '],[' \",\",\",\" .\",\" },\" ),\" "
    "['a','b'] \" ,\"\n"
    "<|endoftext|> is plain text here; so is <|endoftext|>.\n"
    "ctrl\x01\x02\x7f del and a NUL-free end with trailing spaces   ";

static void write_random_text(const char *path, size_t target) {
    static const char *pieces[] = {"a",
                                   "e",
                                   "t",
                                   "th",
                                   "he",
                                   "in",
                                   "the",
                                   "and",
                                   "ing",
                                   "tion",
                                   "A",
                                   "Z",
                                   "Q",
                                   "x",
                                   "\xc3\xa9",
                                   "\xc3\x9f",
                                   "\xc3\xb1",
                                   "\xce\xa9",
                                   "\xd0\xb6",
                                   "\xe6\x97\xa5",
                                   "\xe6\x9c\xac",
                                   "\xed\x95\x9c",
                                   "\xd8\xa7",
                                   "\xcc\x81",
                                   "0",
                                   "1",
                                   "7",
                                   "42",
                                   "\xd9\xa3",
                                   "\xc2\xbd",
                                   "\xc2\xb2",
                                   "'",
                                   "\"",
                                   ",",
                                   ".",
                                   "!",
                                   "?",
                                   "-",
                                   "(",
                                   ")",
                                   "[",
                                   "]",
                                   "{",
                                   "}",
                                   ":",
                                   ";",
                                   "<|",
                                   "|>",
                                   "\xf0\x9f\x98\x80",
                                   "\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd",
                                   "\xe2\x80\x94",
                                   "\xe2\x80\xa6",
                                   " ",
                                   " ",
                                   " ",
                                   " ",
                                   "  ",
                                   "   ",
                                   "\t",
                                   "\n",
                                   "\n\n",
                                   "\xc2\xa0",
                                   "\xe3\x80\x80",
                                   "\r\n",
                                   "\xe2\x80\xa8",
                                   "\xef\xbb\xbf",
                                   "'s",
                                   "'t",
                                   "'re",
                                   "'ve",
                                   "'m",
                                   "'ll",
                                   "'d",
                                   "'S",
                                   "'T",
                                   "'RE",
                                   "x\ny",
                                   ".\nThe"};
    const size_t n_pieces = sizeof pieces / sizeof pieces[0];
    char *buf = malloc(target + 64);
    size_t len = 0;
    uint64_t x = 0x9e3779b97f4a7c15ull;
    while (len < target) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        const char *p = pieces[x % n_pieces];
        size_t m = strlen(p);
        memcpy(buf + len, p, m);
        len += m;
    }
    write_file(path, buf, len);
    free(buf);
}

static void test_gpt2_reference(kd_tokenizer_t *t) {
    const char *whole[] = {"--whole"};
    write_str(tmp_path("crafted.txt"), crafted);
    compare_file(t, "crafted", tmp_path("crafted.txt"), whole, 1);

    /* Random text, whole and in small chunks: the chunks gpt2_reference.js cuts change nothing. */
    write_random_text(tmp_path("random.txt"), 16000);
    const char *both[] = {"--whole", "--chunk=300"};
    compare_file(t, "random", tmp_path("random.txt"), both, 2);

    /* One long word: Chinese without spaces (Encoder.js's BPE loop is quadratic in it). */
    static const char *han[] = {"\xe6\x97\xa5", "\xe6\x9c\xac", "\xe4\xb8\xad", "\xe6\x96\x87",
                                "\xe5\xad\x97", "\xe7\xac\xa6", "\xe4\xba\xba", "\xe5\xa4\xa7",
                                "\xe5\xad\xa6", "\xe7\x94\x9f"};
    char word[3 * 600 + 1];
    uint32_t x = 7;
    for (int i = 0; i < 600; i++) {
        x = x * 1103515245u + 12345u;
        memcpy(word + 3 * i, han[(x >> 16) % 10], 3);
    }
    word[sizeof word - 1] = 0;
    write_str(tmp_path("long_word.txt"), word);
    compare_file(t, "long word", tmp_path("long_word.txt"), whole, 1);

    /* A 1.2 MB word is beyond the reference; kd's heap of pairs makes it about linear. Checked:
     * it encodes, the round trip is exact. */
    size_t big_len = 3 * 400000;
    char *big = malloc(big_len);
    for (size_t i = 0; i < big_len / 3; i++) {
        x = x * 1103515245u + 12345u;
        memcpy(big + 3 * i, han[(x >> 16) % 10], 3);
    }
    char err[KD_ERR_LEN] = "";
    ids_t a = {0};
    double t0 = kd_now();
    CHECK(kd_tokenizer_encode(t, big, big_len, &a.v, &a.n, &a.cap, err, sizeof err) == 0);
    fprintf(stderr, "one %zu-byte word: %zu ids in %.2f s\n", big_len, a.n, kd_now() - t0);
    char *back = malloc(big_len);
    size_t blen = 0;
    CHECK(kd_tokenizer_decode(t, a.v, a.n, back, big_len, &blen, err, sizeof err) == 0);
    CHECK(blen == big_len && memcmp(back, big, big_len) == 0);
    free(back);
    free(big);
    ids_free(&a);

    /* The whole King James Bible, in the reference's chunks (whole, it would take hours). */
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "bible -f gen1:1-rev22:21 > '%s'", tmp_path("kjv.txt"));
    CHECK(system(cmd) == 0);
    struct stat st;
    CHECK(stat(tmp_path("kjv.txt"), &st) == 0 && st.st_size > 4000000);
    const char *chunks[] = {""};
    compare_file(t, "kjv", tmp_path("kjv.txt"), chunks, 1);
}

/* ---- gpt2 by hand ---------------------------------------------------------------------------- */

static void expect_ids(kd_tokenizer_t *t, const char *text, const uint32_t *want, size_t n) {
    char err[KD_ERR_LEN] = "";
    ids_t a = {0};
    CHECK(kd_tokenizer_encode(t, text, strlen(text), &a.v, &a.n, &a.cap, err, sizeof err) == 0);
    bool ok = a.n == n;
    for (size_t i = 0; ok && i < n; i++) ok = a.v[i] == want[i];
    if (!ok) {
        fprintf(stderr, "\"%s\" ->", text);
        for (size_t i = 0; i < a.n; i++) fprintf(stderr, " %u", (unsigned)a.v[i]);
        fprintf(stderr, "\n");
    }
    CHECK(ok);
    ids_free(&a);
}

static void test_gpt2_known(kd_tokenizer_t *t) {
    CHECK(strcmp(kd_tokenizer_name(t), "gpt2") == 0);
    CHECK(kd_tokenizer_vocab(t) == 50257);
    CHECK(kd_tokenizer_eot(t) == 50256);
    expect_ids(t, "Hello world", (const uint32_t[]){15496, 995}, 2);
    expect_ids(t, " the", (const uint32_t[]){262}, 1);
    expect_ids(t, "\n\n", (const uint32_t[]){628}, 1);
    expect_ids(t, "a\n\nb", (const uint32_t[]){64, 198, 198, 65}, 4);
    expect_ids(t, "", NULL, 0);
    /* Encoder.js does not special-case the end-of-text text: "<|", "endoftext", "|>" */
    expect_ids(t, "<|endoftext|>", (const uint32_t[]){27, 91, 437, 1659, 5239, 91, 29}, 7);

    char err[KD_ERR_LEN] = "";
    uint32_t eot = 50256;
    char buf[32];
    size_t len = 0;
    CHECK(kd_tokenizer_decode(t, &eot, 1, buf, sizeof buf, &len, err, sizeof err) == 0);
    CHECK(len == 13 && memcmp(buf, "<|endoftext|>", 13) == 0);
    uint32_t bad[2] = {262, 50257};
    CHECK(kd_tokenizer_decode(t, bad, 2, buf, sizeof buf, &len, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "50257");

    /* Invalid UTF-8: the error names the byte offset, nothing is appended. */
    struct {
        const char *text;
        size_t len;
        const char *offset;
    } cases[] = {
        {"abc \xff def", 9, "byte offset 4"},
        {"ab\xe2\x82", 4, "byte offset 2"},
        {"x \xc0\xaf", 4, "byte offset 2"},
        {"\xed\xa0\x80", 3, "byte offset 0"},
        {"caf\xc3\xa9 \xf4\x90\x80\x80", 10, "byte offset 6"},
        {"a \x80", 3, "byte offset 2"},
        {"ok  \xe2\x28\xa1", 7, "byte offset 4"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        ids_t a = {0};
        CHECK(kd_tokenizer_encode(t, "pre", 3, &a.v, &a.n, &a.cap, err, sizeof err) == 0);
        size_t n0 = a.n;
        err[0] = 0;
        CHECK(kd_tokenizer_encode(t, cases[i].text, cases[i].len, &a.v, &a.n, &a.cap, err,
                                  sizeof err) == -1);
        CHECK_ERR_HAS(err, cases[i].offset);
        CHECK(a.n == n0);
        ids_free(&a);
    }

    char fp[KD_TOKENIZER_FP_HEX + 1], fp_bytes[KD_TOKENIZER_FP_HEX + 1];
    kd_tokenizer_fingerprint(t, fp);
    kd_tokenizer_t *b = NULL;
    CHECK(kd_tokenizer_open("bytes", NULL, &b, err, sizeof err) == 0);
    if (b) kd_tokenizer_fingerprint(b, fp_bytes);
    CHECK(strlen(fp) == KD_TOKENIZER_FP_HEX && strcmp(fp, fp_bytes) != 0);
    kd_tokenizer_destroy(&b);
    fprintf(stderr, "gpt2 fingerprint %s\n", fp);
}

/* ---- a tiny vocabulary, and malformed files ----------------------------------------------------
 */

/* GPT-2's byte alphabet as JSON string text: printable bytes stand for themselves, the others
 * for U+0100.. in order. */
static void alphabet_json(int b, char out[16]) {
    static int code[256];
    static bool ready = false;
    if (!ready) {
        int extra = 0;
        for (int i = 0; i < 256; i++) {
            bool printable = (i >= '!' && i <= '~') || (i >= 0xa1 && i <= 0xac) || i >= 0xae;
            code[i] = printable ? i : 256 + extra++;
        }
        ready = true;
    }
    int c = code[b];
    if (c == '"' || c == '\\')
        snprintf(out, 16, "\\%c", c);
    else if (c < 0x80)
        snprintf(out, 16, "%c", c);
    else
        snprintf(out, 16, "\\u%04x", c);
}

/* Writes dir/encoder.json: the 256 bytes (ids 0..255), then extra tokens "key": id. */
static void write_tiny_encoder(const char *dir, const char *extra) {
    char *json = malloc(16384);
    size_t len = 0;
    json[len++] = '{';
    for (int b = 0; b < 256; b++) {
        char s[16];
        alphabet_json(b, s);
        len += (size_t)snprintf(json + len, 64, "%s\"%s\": %d", b ? ", " : "", s, b);
    }
    len += (size_t)snprintf(json + len, 8192, "%s}", extra);
    char p[1300];
    snprintf(p, sizeof p, "%s/encoder.json", dir);
    write_file(p, json, len);
    free(json);
}

static void write_in(const char *dir, const char *name, const char *text) {
    char p[1300];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    write_str(p, text);
}

static const char *mkdir_tmp(const char *name) {
    static char p[1200];
    snprintf(p, sizeof p, "%s/%s", tmp, name);
    char err[KD_ERR_LEN];
    if (kd_mkdirs(p, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    return p;
}

#define TINY_EXTRA  ", \"he\": 256, \"\\u0120t\": 257, \"<|endoftext|>\": 258"
#define TINY_MERGES "#version: 0.2\nh e\n\xc4\xa0 t\n"

/* kd_utf8_repair: valid text unchanged; each byte that starts no well-formed sequence (a lone
 * continuation, an overlong, a surrogate, a cut-off character) becomes U+FFFD. */
static void test_utf8_repair(void) {
    struct {
        const char *in, *want;
    } cases[] = {
        {"plain \xc3\xa9 \xe2\x80\x94 \xf0\x9f\x98\x80",
         "plain \xc3\xa9 \xe2\x80\x94 \xf0\x9f\x98\x80"},
        {"a\x80"
         "b",
         "a\xef\xbf\xbd"
         "b"},
        {"\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd"},                 /* overlong '/' */
        {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* a surrogate */
        {"end \xe2\x80", "end \xef\xbf\xbd\xef\xbf\xbd"},         /* cut inside a character */
        {"", ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t n = strlen(cases[i].in);
        char out[64];
        CHECK(kd_utf8_repair(cases[i].in, n, out) == strlen(cases[i].want));
        CHECK(strcmp(out, cases[i].want) == 0);
    }
}

static void test_tiny(void) {
    char err[KD_ERR_LEN] = "";
    const char *dir = mkdir_tmp("tiny");
    write_tiny_encoder(dir, TINY_EXTRA);
    write_in(dir, "vocab.bpe", TINY_MERGES);
    kd_tokenizer_t *t = NULL;
    CHECK(kd_tokenizer_open("gpt2", dir, &t, err, sizeof err) == 0);
    if (!t) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    CHECK(kd_tokenizer_vocab(t) == 259 && kd_tokenizer_eot(t) == 258);
    /* " the": Ġ t h e -> (h e, rank 0) Ġ t he -> (Ġ t, rank 1) Ġt he */
    expect_ids(t, "he the", (const uint32_t[]){256, 257, 256}, 3);
    expect_ids(t, "hhee", (const uint32_t[]){'h', 256, 'e'}, 3);
    char fp1[KD_TOKENIZER_FP_HEX + 1], fp2[KD_TOKENIZER_FP_HEX + 1];
    kd_tokenizer_fingerprint(t, fp1);
    kd_tokenizer_destroy(&t);

    /* The same merges in the other order: " the" becomes Ġt h e -> Ġt he, the same ids, but
     * another fingerprint (ranks decide ids in general). */
    write_in(dir, "vocab.bpe", "#version: 0.2\n\xc4\xa0 t\nh e\n");
    CHECK(kd_tokenizer_open("gpt2", dir, &t, err, sizeof err) == 0);
    if (t) kd_tokenizer_fingerprint(t, fp2);
    CHECK(strcmp(fp1, fp2) != 0);
    kd_tokenizer_destroy(&t);
    write_in(dir, "vocab.bpe", TINY_MERGES);
    CHECK(kd_tokenizer_open("gpt2", dir, &t, err, sizeof err) == 0);
    if (t) kd_tokenizer_fingerprint(t, fp2);
    CHECK(strcmp(fp1, fp2) == 0);
    kd_tokenizer_destroy(&t);
}

/* Opening dir must fail with an error that has each of the needles. */
static void expect_open_error(const char *dir, const char *needle1, const char *needle2) {
    char err[KD_ERR_LEN] = "";
    kd_tokenizer_t *t = NULL;
    CHECK(kd_tokenizer_open("gpt2", dir, &t, err, sizeof err) == -1);
    CHECK(t == NULL);
    CHECK_ERR_HAS(err, needle1);
    if (needle2) CHECK_ERR_HAS(err, needle2);
    kd_tokenizer_destroy(&t);
}

static void test_malformed_files(void) {
    const char *d;
    char name[64];
    int k = 0;
#define CASE() (snprintf(name, sizeof name, "bad%d", k++), d = mkdir_tmp(name))

    CASE(); /* nothing there */
    expect_open_error(d, "encoder.json", "install-deps.sh");
    CASE();
    write_in(d, "encoder.json", "{\"a\": 0,");
    expect_open_error(d, "encoder.json:", "malformed JSON");
    CASE();
    write_in(d, "encoder.json", "[1, 2]");
    expect_open_error(d, "encoder.json", "not a JSON object");
    CASE();
    write_in(d, "encoder.json", "{\"a\": 0}");
    expect_open_error(d, "encoder.json", "tokens");
    CASE();
    write_tiny_encoder(d, ", \"he\": 5, \"<|endoftext|>\": 257");
    expect_open_error(d, "encoder.json", "duplicate id 5");
    CASE();
    write_tiny_encoder(d, ", \"he\": 1000, \"<|endoftext|>\": 257");
    expect_open_error(d, "encoder.json", "must be 0..257");
    CASE();
    write_tiny_encoder(d, ", \"he\": -1, \"<|endoftext|>\": 257");
    expect_open_error(d, "encoder.json", "id -1");
    CASE();
    write_tiny_encoder(d, ", \"he\": \"256\", \"<|endoftext|>\": 257");
    expect_open_error(d, "encoder.json", "not an integer");
    CASE();
    write_tiny_encoder(d, ", \"he\": 256, \"he\": 257");
    expect_open_error(d, "encoder.json", "duplicate");
    CASE();
    write_tiny_encoder(d, ", \"he\": 256");
    expect_open_error(d, "encoder.json", "end-of-text");
    CASE();
    write_tiny_encoder(d, ", \"a b\": 256, \"<|endoftext|>\": 257"); /* a space is not in it */
    expect_open_error(d, "encoder.json", "outside GPT-2's byte alphabet");
    CASE(); /* byte 'q' has no token: "q" is spelled "qq" */
    {
        write_tiny_encoder(d, ", \"<|endoftext|>\": 256");
        char p[1300], err[KD_ERR_LEN];
        snprintf(p, sizeof p, "%s/encoder.json", d);
        uint8_t *json = NULL;
        size_t len = 0;
        CHECK(kd_read_file(p, &json, &len, err, sizeof err) == 0);
        char *q = strstr((char *)json, "\"q\"");
        CHECK(q != NULL);
        if (q) {
            char *fixed = malloc(len + 2);
            size_t pre = (size_t)(q - (char *)json);
            memcpy(fixed, json, pre);
            memcpy(fixed + pre, "\"qq\"", 4);
            memcpy(fixed + pre + 4, q + 3, len - pre - 3);
            write_file(p, fixed, len + 1);
            free(fixed);
        }
        free(json);
        write_in(d, "vocab.bpe", "#version: 0.2\n");
        expect_open_error(d, "encoder.json", "byte 0x71");
    }

    /* vocab.bpe, beside a valid encoder.json */
    struct {
        const char *bpe, *needle1, *needle2;
    } bpe[] = {
        {NULL, "vocab.bpe", "install-deps.sh"},
        {"", "vocab.bpe", "empty"},
        {"h e\n", "vocab.bpe:1:", "#version"},
        {"#version: 0.2\nh e x\n", "vocab.bpe:2:", "two tokens; found 3"},
        {"#version: 0.2\nh e\nhe\n", "vocab.bpe:3:", "two tokens; found 1"},
        {"#version: 0.2\nh e\n\n", "vocab.bpe:3:", "found 0"},
        {"#version: 0.2\nh zz\n", "vocab.bpe:2:", "\"zz\" is not in the vocabulary"},
        {"#version: 0.2\nh e\nt h\n", "vocab.bpe:3:", "not in"},
        {"#version: 0.2\nh e\n\xc4\xa0 t", "vocab.bpe", "newline"},
        {"#version: 0.2\n\xff e\n", "vocab.bpe:2:", "invalid UTF-8"},
        {"#version: 0.2\nh \xc5\x90\n", "vocab.bpe:2:", "outside GPT-2's byte alphabet"},
    };
    for (size_t i = 0; i < sizeof bpe / sizeof bpe[0]; i++) {
        CASE();
        write_tiny_encoder(d, TINY_EXTRA);
        if (bpe[i].bpe) write_in(d, "vocab.bpe", bpe[i].bpe);
        expect_open_error(d, bpe[i].needle1, bpe[i].needle2);
    }
    /* CRLF line ends are whitespace to Encoder.js's split too: accepted */
    CASE();
    write_tiny_encoder(d, TINY_EXTRA);
    write_in(d, "vocab.bpe", "#version: 0.2\r\nh e\r\n\xc4\xa0 t\r\n");
    char err[KD_ERR_LEN] = "";
    kd_tokenizer_t *t = NULL;
    CHECK(kd_tokenizer_open("gpt2", d, &t, err, sizeof err) == 0);
    if (t) expect_ids(t, "he the", (const uint32_t[]){256, 257, 256}, 3);
    kd_tokenizer_destroy(&t);
#undef CASE
}

int main(void) {
    snprintf(tmp, sizeof tmp, "%s", kd_test_tmpdir("tokenizer"));
    snprintf(gpt2_dir, sizeof gpt2_dir, "%s", kd_tokenizer_gpt2_dir());
    test_bytes();
    test_utf8_repair();
    test_tiny();
    test_malformed_files();

    char err[KD_ERR_LEN] = "";
    kd_tokenizer_t *t = NULL;
    bool ready = have_reference();
    CHECK(ready);
    if (kd_tokenizer_open("gpt2", NULL, &t, err, sizeof err) != 0) {
        fprintf(stderr, "test_tokenizer: %s\n", err);
        CHECK(0);
    }
    if (t) test_gpt2_known(t);
    if (t && ready) test_gpt2_reference(t);
    kd_tokenizer_destroy(&t);
    return kd_test_done("test_tokenizer");
}
