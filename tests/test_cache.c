/* test_cache: the teacher-logit cache (kd_cache). Each encoding round-trips against an
 * independent reference (the compiler's _Float16 for fp16, the quantisation bound for int8, a
 * naive top-k and softmax for topk); fp16 files are half the size of fp32 files; torn, flipped,
 * truncated and zeroed blocks are reported or read as misses and serve again once rewritten; two
 * processes create and write one entry at once; a writer killed with SIGKILL leaves the entry
 * consistent; fingerprints follow every byte; export, import, ls and gc; malformed manifests
 * and data files give errors that name the file and field. */
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>

#include "kd_cache.h"
#include "kd_npy.h"
#include "kd_util.h"

#include "kd_test.h"
#include "kd_test_cluster.h"

/* The on-disk layout documented in kd_cache.c, so the tests can damage precise bytes. */
#define FILE_HEADER  64
#define BLOCK_HEADER 32

static const char *tmp;

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

/* ---- fixtures -------------------------------------------------------------------------------- */

/* Deterministic logits in about [-12, 12], with a constant row, ties and a wide row. */
static float *make_logits(size_t n, int C, uint64_t seed) {
    float *x = malloc(n * (size_t)C * sizeof(float));
    uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
    for (size_t i = 0; i < n * (size_t)C; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        double u = (double)(s >> 11) / 9007199254740992.0;
        x[i] = (float)(24.0 * u - 12.0);
    }
    if (n > 3) {
        for (int c = 0; c < C; c++) x[1 * (size_t)C + c] = 2.5f;                    /* constant */
        for (int c = 0; c < C; c++) x[2 * (size_t)C + c] = (float)(c % 3);          /* ties */
        for (int c = 0; c < C; c++) x[3 * (size_t)C + c] = (c % 2 ? 1 : -1) * 3e4f; /* wide */
    }
    return x;
}

static kd_cache_key_t make_key(const char *teacher, const char *data, size_t n, int C,
                               kd_cache_encoding_t enc, int k, size_t block_rows) {
    kd_cache_key_t key = {
        .n_samples = n, .n_classes = C, .encoding = enc, .k = k, .block_rows = block_rows};
    kd_cache_fingerprint_import(teacher, key.teacher_fp); /* any 32 hex digits will do */
    kd_cache_fingerprint_import(data, key.data_fp);
    snprintf(key.teacher_desc, sizeof key.teacher_desc, "test teacher %s", teacher);
    snprintf(key.data_desc, sizeof key.data_desc, "test data %s", data);
    return key;
}

static kd_cache_t *open_or_die(const char *dir, const kd_cache_key_t *key) {
    char err[KD_ERR_LEN];
    kd_cache_t *c = kd_cache_open(dir, key, err, sizeof err);
    if (!c) {
        fprintf(stderr, "kd_cache_open(%s): %s\n", dir, err);
        exit(1);
    }
    return c;
}

static int put_all(kd_cache_t *c, const float *x) {
    char err[KD_ERR_LEN];
    size_t C = (size_t)kd_cache_key(c)->n_classes, R = kd_cache_block_rows(c);
    for (size_t b = 0; b < kd_cache_blocks(c); b++)
        if (kd_cache_put_block(c, b, x + b * R * C, err, sizeof err) != 0) {
            fprintf(stderr, "put_block %zu: %s\n", b, err);
            return -1;
        }
    return 0;
}

/* Reads every block; returns how many were hits, decoded into out (n, C). */
static size_t get_all(kd_cache_t *c, float *out) {
    char err[KD_ERR_LEN];
    size_t C = (size_t)kd_cache_key(c)->n_classes, R = kd_cache_block_rows(c), hits = 0;
    for (size_t b = 0; b < kd_cache_blocks(c); b++)
        hits += kd_cache_get_block(c, b, out + b * R * C, err, sizeof err) == KD_CACHE_HIT;
    return hits;
}

static off_t block_offset(const kd_cache_t *c, size_t b) {
    const kd_cache_key_t *k = kd_cache_key(c);
    size_t rec = k->encoding == KD_ENC_FP32   ? 4 * (size_t)k->n_classes
                 : k->encoding == KD_ENC_FP16 ? 2 * (size_t)k->n_classes
                 : k->encoding == KD_ENC_INT8 ? 8 + (size_t)k->n_classes
                                              : 8 + 2 * (size_t)(k->k - 1) + 2 * (size_t)k->k;
    return (off_t)(FILE_HEADER + b * (BLOCK_HEADER + k->block_rows * rec));
}

static const char *data_file(const kd_cache_t *c) {
    static char p[2048];
    snprintf(p, sizeof p, "%s/logits.bin", kd_cache_dir(c));
    return p;
}

static void write_bytes(const char *path, off_t off, const void *bytes, size_t n) {
    int fd = open(path, O_WRONLY);
    if (fd < 0 || pwrite(fd, bytes, n, off) != (ssize_t)n) {
        fprintf(stderr, "cannot write %s: %s\n", path, strerror(errno));
        exit(1);
    }
    close(fd);
}

static void flip_byte(const char *path, off_t off) {
    int fd = open(path, O_RDWR);
    uint8_t b = 0;
    if (fd < 0 || pread(fd, &b, 1, off) != 1) exit(1);
    b ^= 0x5a;
    if (pwrite(fd, &b, 1, off) != 1) exit(1);
    close(fd);
}

static off_t file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : -1;
}

static bool same_bits(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

/* ---- encodings against references ------------------------------------------------------------ */

static void check_fp16(const float *x, const float *y, size_t n) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        float want = (float)(_Float16)x[i]; /* the compiler's round-to-nearest-even */
        if (memcmp(&want, &y[i], sizeof want) != 0 && bad++ < 5)
            fprintf(stderr, "fp16: %.9g -> %.9g, want %.9g\n", (double)x[i], (double)y[i],
                    (double)want);
    }
    CHECK(bad == 0);
}

static void check_int8(const float *x, const float *y, size_t n, int C) {
    size_t bad = 0;
    for (size_t r = 0; r < n; r++) {
        const float *a = x + r * (size_t)C, *b = y + r * (size_t)C;
        float lo = a[0], hi = a[0];
        for (int c = 1; c < C; c++) lo = fminf(lo, a[c]), hi = fmaxf(hi, a[c]);
        double half_step = ((double)hi - lo) / 254.0 / 2.0;
        double slack = 4 * FLT_EPSILON * fmax(fabs(hi), fabs(lo));
        for (int c = 0; c < C; c++)
            if (fabs((double)a[c] - b[c]) > half_step + slack && bad++ < 5)
                fprintf(stderr, "int8 row %zu class %d: %.9g -> %.9g (half step %g)\n", r, c,
                        (double)a[c], (double)b[c], half_step);
    }
    CHECK(bad == 0);
}

/* Naive top-k: repeatedly the largest unpicked value, the lower class on ties. */
static void naive_topk(const float *x, int C, int k, int *idx) {
    bool picked[4096] = {false};
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int c = 0; c < C; c++)
            if (!picked[c] && (best < 0 || x[c] > x[best])) best = c;
        picked[best] = true;
        idx[j] = best;
    }
}

static void softmax(const float *x, int C, double *p) {
    double m = -INFINITY, z = 0;
    for (int c = 0; c < C; c++) m = fmax(m, x[c]);
    for (int c = 0; c < C; c++) z += (p[c] = exp((double)x[c] - m));
    for (int c = 0; c < C; c++) p[c] /= z;
}

static void check_topk(const float *x, const float *y, size_t n, int C, int k) {
    size_t bad = 0;
    int idx[4096];
    double p[4096], q[4096];
    for (size_t r = 0; r < n; r++) {
        const float *a = x + r * (size_t)C, *b = y + r * (size_t)C;
        naive_topk(a, C, k, idx);
        bool top[4096] = {false};
        /* The largest kept logit exactly; the others as it plus their difference to it in fp16,
         * within half an fp16 step (2^-11 relative) and the float rounding of the sum. */
        const double largest = a[idx[0]];
        double worst = 0;
        for (int j = 0; j < k; j++) {
            top[idx[j]] = true;
            const double d = fabs((double)a[idx[j]] - b[idx[j]]);
            worst = fmax(worst, d);
            const double step = fabs(a[idx[j]] - largest) / 2048 + 2 * FLT_EPSILON * fabs(largest);
            if ((j == 0 ? d != 0 : d > step) && bad++ < 5)
                fprintf(stderr, "topk row %zu: class %d %.9g -> %.9g\n", r, idx[j],
                        (double)a[idx[j]], (double)b[idx[j]]);
        }
        softmax(a, C, p);
        softmax(b, C, q);
        /* The shared rest logit is computed, so it is rounded to float: its relative error,
         * and so that of the probabilities, is a few float ulps of the row's magnitude; a kept
         * logit off by e moves the probabilities by a relative 2e at most. */
        double mag = 0;
        for (int c = 0; c < C; c++) mag = fmax(mag, fabs(a[c]));
        double tol = 1e-6 + 4 * FLT_EPSILON * mag + 2 * worst;
        double rest_p = 0, rest_q = 0;
        float fill = 0;
        bool have_fill = false;
        for (int c = 0; c < C; c++) {
            if (top[c]) {
                if (fabs(p[c] - q[c]) > tol * p[c] + 1e-12 && bad++ < 5)
                    fprintf(stderr, "topk row %zu class %d: p %.9g q %.9g\n", r, c, p[c], q[c]);
                continue;
            }
            rest_p += p[c];
            rest_q += q[c];
            if (have_fill && b[c] != fill && bad++ < 5)
                fprintf(stderr, "topk row %zu: rest classes differ\n", r);
            fill = b[c], have_fill = true;
        }
        if (fabs(rest_p - rest_q) > tol * rest_p + 1e-12 && bad++ < 5)
            fprintf(stderr, "topk row %zu: rest mass %.9g -> %.9g\n", r, rest_p, rest_q);
    }
    CHECK(bad == 0);
}

static void test_encoding(kd_cache_encoding_t enc, int k) {
    const size_t N = 1000, R = 64;
    const int C = 10;
    float *x = make_logits(N, C, 7 + (uint64_t)enc * 10 + (uint64_t)k);
    /* fp16 corner cases: subnormals, exact ties, the largest finite half. */
    const float specials[10] = {1e-6f,          -3e-5f,   65504.0f, 2049.0f, 2051.0f,
                                1.00048828125f, 5.96e-8f, 2.98e-8f, -0.0f,   0.1f};
    memcpy(x + 5 * C, specials, sizeof specials);
    char dir[256];
    snprintf(dir, sizeof dir, "enc-%s%d", kd_cache_encoding_name(enc), k);
    const char *root = tmp_path(dir);
    kd_cache_key_t key = make_key("teacher", "data", N, C, enc, k, R);
    char err[KD_ERR_LEN];
    float *y = calloc(N * C, sizeof(float));

    kd_cache_t *c = open_or_die(root, &key);
    CHECK(kd_cache_blocks(c) == 16 && kd_cache_rows_in_block(c, 15) == N - 15 * R);
    float sentinel = 12345.0f;
    y[0] = sentinel;
    CHECK(kd_cache_get_block(c, 0, y, err, sizeof err) == KD_CACHE_MISS);
    CHECK(y[0] == sentinel); /* a miss leaves the caller's buffer alone */
    CHECK(put_all(c, x) == 0);
    kd_cache_close(&c);

    c = open_or_die(root, &key); /* read back through a fresh handle: from the file */
    CHECK(get_all(c, y) == kd_cache_blocks(c));
    CHECK(kd_cache_stats(c).hits == kd_cache_blocks(c) && kd_cache_stats(c).misses == 0);
    if (enc == KD_ENC_FP32) CHECK(same_bits(x, y, N * C));
    if (enc == KD_ENC_FP16) check_fp16(x, y, N * C);
    if (enc == KD_ENC_INT8) check_int8(x, y, N, C);
    if (enc == KD_ENC_TOPK) check_topk(x, y, N, C, k);
    kd_cache_verify_t v;
    CHECK(kd_cache_verify(c, &v, NULL, NULL, err, sizeof err) == 0);
    CHECK(v.ok == kd_cache_blocks(c) && v.missing == 0 && v.corrupt == 0);
    kd_cache_close(&c);
    free(x);
    free(y);
}

static void test_fp16_half_size(void) {
    const size_t N = 4096;
    const int C = 64;
    float *x = make_logits(N, C, 3);
    kd_cache_key_t k32 = make_key("t", "d", N, C, KD_ENC_FP32, 0, 256);
    kd_cache_key_t k16 = make_key("t", "d", N, C, KD_ENC_FP16, 0, 256);
    kd_cache_t *c32 = open_or_die(tmp_path("size"), &k32);
    kd_cache_t *c16 = open_or_die(tmp_path("size"), &k16);
    CHECK(put_all(c32, x) == 0 && put_all(c16, x) == 0);
    struct stat s32, s16;
    CHECK(stat(data_file(c32), &s32) == 0);
    CHECK(stat(data_file(c16), &s16) == 0);
    double apparent = (double)s16.st_size / (double)s32.st_size;
    double disk = (double)s16.st_blocks / (double)s32.st_blocks;
    fprintf(stderr, "fp32 %lld bytes, fp16 %lld bytes: ratio %.4f (on disk %.4f)\n",
            (long long)s32.st_size, (long long)s16.st_size, apparent, disk);
    CHECK(apparent > 0.49 && apparent < 0.51);
    CHECK(disk > 0.47 && disk < 0.53);
    kd_cache_close(&c32);
    kd_cache_close(&c16);
    free(x);
}

/* ---- damage ---------------------------------------------------------------------------------- */

/* Block b reads as corrupt with a message naming the data file and the block, leaves the
 * buffer alone, and serves again once rewritten. */
static void expect_corrupt_then_repair(kd_cache_t *c, size_t b, const float *x, const char *why) {
    size_t C = (size_t)kd_cache_key(c)->n_classes, R = kd_cache_block_rows(c);
    size_t rows = kd_cache_rows_in_block(c, b);
    float *y = malloc(R * C * sizeof(float));
    y[0] = 777.0f;
    char err[KD_ERR_LEN] = "", block[64];
    uint64_t corrupt0 = kd_cache_stats(c).corrupt;
    CHECK(kd_cache_get_block(c, b, y, err, sizeof err) == KD_CACHE_CORRUPT);
    CHECK(y[0] == 777.0f);
    CHECK(kd_cache_stats(c).corrupt == corrupt0 + 1);
    snprintf(block, sizeof block, "block %zu ", b);
    CHECK_ERR_HAS(err, data_file(c));
    CHECK_ERR_HAS(err, block);
    CHECK_ERR_HAS(err, why);
    CHECK(kd_cache_put_block(c, b, x + b * R * C, err, sizeof err) == 0);
    CHECK(kd_cache_get_block(c, b, y, err, sizeof err) == KD_CACHE_HIT);
    CHECK(same_bits(y, x + b * R * C, rows * C));
    free(y);
}

static void count_bad(void *user, size_t block, const char *msg) {
    (void)msg;
    ((size_t *)user)[0]++;
    ((size_t *)user)[1] = block;
}

static void test_torn_blocks(void) {
    const size_t N = 600, R = 64;
    const int C = 10;
    float *x = make_logits(N, C, 11);
    kd_cache_key_t key = make_key("t", "d", N, C, KD_ENC_FP32, 0, R);
    kd_cache_t *c = open_or_die(tmp_path("torn"), &key);
    CHECK(put_all(c, x) == 0);
    const char *f = data_file(c);
    char err[KD_ERR_LEN];

    flip_byte(f, block_offset(c, 2) + BLOCK_HEADER + 100); /* a record byte */
    size_t bad[2] = {0, 0};
    kd_cache_verify_t v;
    CHECK(kd_cache_verify(c, &v, count_bad, bad, err, sizeof err) == 0);
    CHECK(v.corrupt == 1 && v.ok == kd_cache_blocks(c) - 1 && bad[0] == 1 && bad[1] == 2);
    expect_corrupt_then_repair(c, 2, x, "checksum mismatch");

    flip_byte(f, block_offset(c, 3)); /* the written marker */
    expect_corrupt_then_repair(c, 3, x, "marker");

    uint8_t zeros[BLOCK_HEADER] = {0}; /* header lost, records written: a torn write */
    write_bytes(f, block_offset(c, 4), zeros, sizeof zeros);
    expect_corrupt_then_repair(c, 4, x, "torn");

    flip_byte(f, block_offset(c, 5) + 4); /* the block number in the header */
    expect_corrupt_then_repair(c, 5, x, "header says block");

    /* Block 6 copied over block 7: a misplaced write. */
    size_t len = BLOCK_HEADER + R * C * 4;
    uint8_t *copy = malloc(len);
    int fd = open(f, O_RDONLY);
    CHECK(pread(fd, copy, len, block_offset(c, 6)) == (ssize_t)len);
    close(fd);
    write_bytes(f, block_offset(c, 7), copy, len);
    free(copy);
    expect_corrupt_then_repair(c, 7, x, "header says block 6");

    /* The file cut inside the last block: torn; cut at a block boundary: missing. */
    size_t last = kd_cache_blocks(c) - 1;
    CHECK(truncate(f, block_offset(c, last) + BLOCK_HEADER + 10) == 0);
    expect_corrupt_then_repair(c, last, x, "file ends inside");
    CHECK(truncate(f, block_offset(c, last)) == 0);
    float *y = malloc(R * C * sizeof(float));
    CHECK(kd_cache_get_block(c, last, y, err, sizeof err) == KD_CACHE_MISS);
    CHECK(kd_cache_put_block(c, last, x + last * R * C, err, sizeof err) == 0);
    CHECK(kd_cache_get_block(c, last, y, err, sizeof err) == KD_CACHE_HIT);

    /* A block overwritten with zeros (a hole) is a plain miss, not corruption. */
    size_t blen = BLOCK_HEADER + R * C * 4;
    uint8_t *z = calloc(1, blen);
    write_bytes(f, block_offset(c, 1), z, blen);
    free(z);
    uint64_t corrupt0 = kd_cache_stats(c).corrupt;
    CHECK(kd_cache_get_block(c, 1, y, err, sizeof err) == KD_CACHE_MISS);
    CHECK(kd_cache_stats(c).corrupt == corrupt0);
    CHECK(kd_cache_verify(c, &v, NULL, NULL, err, sizeof err) == 0);
    CHECK(v.missing == 1 && v.corrupt == 0);
    free(y);
    kd_cache_close(&c);
    free(x);
}

static void test_sparse_holes(void) {
    const size_t N = 1000, R = 100;
    const int C = 10;
    float *x = make_logits(N, C, 5);
    kd_cache_key_t key = make_key("t", "d", N, C, KD_ENC_INT8, 0, R);
    kd_cache_t *c = open_or_die(tmp_path("holes"), &key);
    char err[KD_ERR_LEN];
    CHECK(kd_cache_put_block(c, 0, x, err, sizeof err) == 0);
    CHECK(kd_cache_put_block(c, 9, x + 9 * R * C, err, sizeof err) == 0);
    float *y = malloc(R * C * sizeof(float));
    for (size_t b = 1; b < 9; b++)
        CHECK(kd_cache_get_block(c, b, y, err, sizeof err) == KD_CACHE_MISS);
    CHECK(kd_cache_get_block(c, 9, y, err, sizeof err) == KD_CACHE_HIT);
    size_t written = 0;
    CHECK(kd_cache_coverage(c, &written, err, sizeof err) == 0 && written == 2);
    kd_cache_stats_t s = kd_cache_stats(c);
    CHECK(s.hits == 1 && s.misses == 8 && s.corrupt == 0 && s.puts == 2);
    /* Out of range and non-finite logits are errors, not crashes. */
    CHECK(kd_cache_get_block(c, 10, y, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "out of range");
    memcpy(y, x, R * C * sizeof(float));
    y[37] = NAN;
    CHECK(kd_cache_put_block(c, 3, y, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "sample 303 class 7");
    CHECK(kd_cache_get_block(c, 3, y, err, sizeof err) == KD_CACHE_MISS);
    free(y);
    kd_cache_close(&c);
    free(x);
}

/* ---- processes ------------------------------------------------------------------------------- */

/* Child: waits on the start pipe, then opens (creating) the entry and writes every block
 * `rounds` times, in ascending or descending order. */
static int writer_child(int start_fd, const char *dir, const kd_cache_key_t *key, const float *x,
                        bool descending, int rounds) {
    char byte;
    if (read(start_fd, &byte, 1) < 0) return 3;
    char err[KD_ERR_LEN];
    kd_cache_t *c = kd_cache_open(dir, key, err, sizeof err);
    if (!c) {
        fprintf(stderr, "child %d: %s\n", (int)getpid(), err);
        return 2;
    }
    size_t n = kd_cache_blocks(c), R = kd_cache_block_rows(c), C = (size_t)key->n_classes;
    for (int r = 0; r < rounds; r++)
        for (size_t i = 0; i < n; i++) {
            size_t b = descending ? n - 1 - i : i;
            if (kd_cache_put_block(c, b, x + b * R * C, err, sizeof err) != 0) {
                fprintf(stderr, "child %d: %s\n", (int)getpid(), err);
                return 1;
            }
        }
    kd_cache_close(&c);
    return 0;
}

static int count_dir_entries(const char *path, const char *prefix) {
    char cmd[2300], out[64] = "";
    snprintf(cmd, sizeof cmd, "ls -a '%s' | grep -c '^%s' ", path, prefix);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    if (!fgets(out, sizeof out, p)) out[0] = 0;
    pclose(p);
    return atoi(out);
}

static void test_concurrent_writers(void) {
    const size_t N = 20000, R = 64;
    const int C = 10;
    float *x = make_logits(N, C, 21);
    float *y = malloc(N * C * sizeof(float));
    const char *root = tmp_path("concurrent");
    for (int round = 0; round < 4; round++) {
        char data[32];
        snprintf(data, sizeof data, "data-%d", round);
        kd_cache_key_t key = make_key("t", data, N, C, round % 2 ? KD_ENC_FP16 : KD_ENC_FP32, 0, R);
        int start[2];
        CHECK(pipe(start) == 0);
        pid_t pids[2];
        for (int w = 0; w < 2; w++) {
            pids[w] = fork();
            if (pids[w] == 0) {
                close(start[1]);
                _exit(writer_child(start[0], root, &key, x, w == 1, 2));
            }
        }
        close(start[0]);
        close(start[1]); /* both children start now: they race to create the entry */
        for (int w = 0; w < 2; w++) CHECK(kd_test_wait(pids[w], 30) == 0);

        kd_cache_t *c = open_or_die(root, &key);
        char err[KD_ERR_LEN];
        kd_cache_verify_t v;
        CHECK(kd_cache_verify(c, &v, NULL, NULL, err, sizeof err) == 0);
        CHECK(v.ok == kd_cache_blocks(c) && v.corrupt == 0 && v.missing == 0);
        CHECK(get_all(c, y) == kd_cache_blocks(c));
        if (key.encoding == KD_ENC_FP32)
            CHECK(same_bits(x, y, N * C));
        else
            check_fp16(x, y, N * C);
        char pair[2048];
        snprintf(pair, sizeof pair, "%s/%s-%s", root, key.teacher_fp, key.data_fp);
        CHECK(count_dir_entries(pair, "\\.tmp") == 0); /* the loser cleaned up */
        CHECK(count_dir_entries(pair, "fp") == 1);
        kd_cache_close(&c);
    }
    free(x);
    free(y);
}

/* A writer killed with SIGKILL while writing big blocks: every block afterwards is valid,
 * missing, or reported torn (and then rewritable); none serves wrong data. */
static void test_killed_writer(void) {
    const size_t N = 16384, R = 512;
    const int C = 256;
    float *x = make_logits(N, C, 31);
    kd_cache_key_t key = make_key("t", "killed", N, C, KD_ENC_FP32, 0, R);
    const char *root = tmp_path("killed");
    int progress[2];
    CHECK(pipe(progress) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(progress[0]);
        char err[KD_ERR_LEN];
        kd_cache_t *c = kd_cache_open(root, &key, err, sizeof err);
        if (!c) _exit(2);
        for (;;) /* until killed: rewrite blocks, reporting each one */
            for (size_t b = 0; b < kd_cache_blocks(c); b++) {
                if (kd_cache_put_block(c, b, x + b * R * C, err, sizeof err) != 0) _exit(1);
                if (write(progress[1], "b", 1) != 1) _exit(1);
            }
    }
    close(progress[1]);
    /* Wait until it has written 10 of the 32 blocks of its first pass, then kill it. */
    int seen = 0;
    double deadline = kd_test_now() + 20;
    while (seen < 10 && kd_test_now() < deadline) {
        struct pollfd p = {.fd = progress[0], .events = POLLIN};
        char buf[64];
        if (poll(&p, 1, 100) > 0) {
            ssize_t r = read(progress[0], buf, sizeof buf);
            if (r <= 0) break;
            seen += (int)r;
        }
    }
    CHECK(seen >= 10);
    kill(pid, SIGKILL);
    CHECK(kd_test_wait(pid, 10) == 128 + SIGKILL);
    close(progress[0]);

    kd_cache_t *c = open_or_die(root, &key);
    char err[KD_ERR_LEN];
    kd_cache_verify_t v;
    CHECK(kd_cache_verify(c, &v, NULL, NULL, err, sizeof err) == 0);
    fprintf(stderr, "after SIGKILL: %zu ok, %zu missing, %zu corrupt of %zu blocks\n", v.ok,
            v.missing, v.corrupt, kd_cache_blocks(c));
    CHECK(v.ok + v.missing + v.corrupt == kd_cache_blocks(c));
    CHECK(v.ok >= 10 && v.corrupt <= 1); /* at most the block in flight is torn */
    float *y = malloc(R * C * sizeof(float));
    for (size_t b = 0; b < kd_cache_blocks(c); b++) {
        int st = kd_cache_get_block(c, b, y, err, sizeof err);
        if (st == KD_CACHE_HIT) CHECK(same_bits(y, x + b * R * C, R * C));
        if (st != KD_CACHE_HIT) { /* the torn one: recompute and rewrite */
            CHECK(kd_cache_put_block(c, b, x + b * R * C, err, sizeof err) == 0);
            CHECK(kd_cache_get_block(c, b, y, err, sizeof err) == KD_CACHE_HIT);
        }
    }
    CHECK(kd_cache_verify(c, &v, NULL, NULL, err, sizeof err) == 0 && v.ok == kd_cache_blocks(c));
    free(y);
    kd_cache_close(&c);
    free(x);
}

/* Claims: one holder per block across handles and processes; a dead holder's claim is gone. */
static void test_claims(void) {
    const size_t N = 1000, R = 100;
    kd_cache_key_t key = make_key("t", "claims", N, 4, KD_ENC_FP32, 0, R);
    const char *root = tmp_path("claims");
    kd_cache_t *a = open_or_die(root, &key), *b = open_or_die(root, &key);
    CHECK(kd_cache_claim_block(a, 3) == KD_CACHE_CLAIMED);
    CHECK(kd_cache_claim_block(b, 3) == KD_CACHE_CLAIM_BUSY);
    CHECK(kd_cache_claim_block(b, 4) == KD_CACHE_CLAIMED); /* a neighbour is free */
    kd_cache_release_block(a, 3);
    CHECK(kd_cache_claim_block(b, 3) == KD_CACHE_CLAIMED);
    kd_cache_release_block(b, 3);
    kd_cache_release_block(b, 4);

    int held[2], die[2];
    CHECK(pipe(held) == 0 && pipe(die) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        char err[KD_ERR_LEN], c;
        kd_cache_t *own = kd_cache_open(root, &key, err, sizeof err);
        if (!own || kd_cache_claim_block(own, 7) != KD_CACHE_CLAIMED) _exit(2);
        if (write(held[1], "h", 1) != 1 || read(die[0], &c, 1) < 0) _exit(3);
        _exit(0); /* killed before this */
    }
    char c;
    CHECK(read(held[0], &c, 1) == 1); /* the child holds block 7 */
    CHECK(kd_cache_claim_block(a, 7) == KD_CACHE_CLAIM_BUSY);
    kill(pid, SIGKILL);
    CHECK(kd_test_wait(pid, 10) == 128 + SIGKILL);
    CHECK(kd_cache_claim_block(a, 7) == KD_CACHE_CLAIMED);
    for (int i = 0; i < 2; i++) close(held[i]), close(die[i]);
    kd_cache_close(&a);
    kd_cache_close(&b);

    kd_cache_t *ro = NULL;
    char err[KD_ERR_LEN], dir[2048];
    snprintf(dir, sizeof dir, "%s/%s-%s/fp32", root, key.teacher_fp, key.data_fp);
    CHECK((ro = kd_cache_open_entry(dir, err, sizeof err)) != NULL);
    if (ro) CHECK(kd_cache_claim_block(ro, 1) == KD_CACHE_CLAIM_UNSUPPORTED); /* read-only */
    kd_cache_close(&ro);
}

/* A creation that crashed before its rename leaves a temporary directory: it is invisible to
 * open and ls, and gc removes it once it is old. */
static void test_crashed_creation(void) {
    const char *root = tmp_path("crashed");
    kd_cache_key_t key = make_key("t", "crash", 100, 10, KD_ENC_FP16, 0, 16);
    char pair[2048], path[2200], err[KD_ERR_LEN];
    snprintf(pair, sizeof pair, "%s/%s-%s", root, key.teacher_fp, key.data_fp);
    snprintf(path, sizeof path, "%s/.tmp-fp16-abc123", pair);
    CHECK(kd_mkdirs(path, err, sizeof err) == 0);
    snprintf(path, sizeof path, "%s/.tmp-fp16-abc123/logits.bin", pair);
    CHECK(kd_write_file_atomic(path, "partial", 7, err, sizeof err) == 0);
    kd_cache_entry_info_t *list;
    size_t n;
    CHECK(kd_cache_list(root, &list, &n, err, sizeof err) == 0 && n == 0);
    free(list);
    kd_cache_t *c = open_or_die(root, &key);
    float *x = make_logits(100, 10, 1);
    CHECK(put_all(c, x) == 0);
    kd_cache_close(&c);
    free(x);
    size_t removed;
    CHECK(kd_cache_gc(root, "zzzz", -1, NULL, NULL, &removed, err, sizeof err) == 0);
    CHECK(removed == 0 && count_dir_entries(pair, "\\.tmp") == 1); /* young: maybe in use */
    snprintf(path, sizeof path, "%s/.tmp-fp16-abc123", pair);
    struct timeval old[2] = {{time(NULL) - 7200, 0}, {time(NULL) - 7200, 0}};
    CHECK(utimes(path, old) == 0);
    CHECK(kd_cache_gc(root, "zzzz", -1, NULL, NULL, &removed, err, sizeof err) == 0);
    CHECK(count_dir_entries(pair, "\\.tmp") == 0 && count_dir_entries(pair, "fp16") == 1);
}

/* ---- fingerprints ---------------------------------------------------------------------------- */

static void test_fingerprints(void) {
    static const kd_layer_spec_t mlp[] = {{.kind = KD_LAYER_FLATTEN},
                                          {.kind = KD_LAYER_LINEAR, .out_features = 8},
                                          {.kind = KD_LAYER_RELU},
                                          {.kind = KD_LAYER_LINEAR, .out_features = 3}};
    static const kd_layer_spec_t mlp_gelu[] = {{.kind = KD_LAYER_FLATTEN},
                                               {.kind = KD_LAYER_LINEAR, .out_features = 8},
                                               {.kind = KD_LAYER_GELU},
                                               {.kind = KD_LAYER_LINEAR, .out_features = 3}};
    kd_shape_t in = {1, 4, 4};
    kd_model_t *a = NULL, *b = NULL;
    char err[KD_ERR_LEN];
    CHECK(kd_model_new(mlp, 4, in, &a, err, sizeof err) == 0);
    CHECK(kd_model_new(mlp_gelu, 4, in, &b, err, sizeof err) == 0);
    if (!a || !b) return;
    kd_model_init_params(a, 1);
    kd_model_init_params(b, 1);
    char fa[KD_CACHE_FP_HEX + 1], fb[KD_CACHE_FP_HEX + 1], f2[KD_CACHE_FP_HEX + 1];
    kd_cache_fingerprint_teacher(a, fa);
    kd_cache_fingerprint_teacher(b, fb);
    CHECK(strlen(fa) == KD_CACHE_FP_HEX && strspn(fa, "0123456789abcdef") == KD_CACHE_FP_HEX);
    CHECK(strcmp(fa, fb) != 0); /* same weights, other architecture */
    kd_cache_fingerprint_teacher(a, f2);
    CHECK(strcmp(fa, f2) == 0);
    uint8_t *bytes = (uint8_t *)a->params;
    bytes[4 * 57 + 2] ^= 1; /* one byte of one weight */
    kd_cache_fingerprint_teacher(a, f2);
    CHECK(strcmp(fa, f2) != 0);
    bytes[4 * 57 + 2] ^= 1;
    bytes[4 * a->n_params - 1] ^= 0x80; /* the last byte of the last bias */
    kd_cache_fingerprint_teacher(a, f2);
    CHECK(strcmp(fa, f2) != 0);
    kd_model_destroy(&a);
    kd_model_destroy(&b);

    uint8_t pixels[5 * 4];
    int32_t labels[5] = {0, 1, 2, 1, 0};
    for (int i = 0; i < 20; i++) pixels[i] = (uint8_t)(i * 13);
    kd_dataset_t ds = {.n = 5,
                       .channels = 1,
                       .height = 2,
                       .width = 2,
                       .sample_dim = 4,
                       .num_classes = 3,
                       .pixels = pixels,
                       .labels = labels};
    char d0[KD_CACHE_FP_HEX + 1], d1[KD_CACHE_FP_HEX + 1];
    kd_cache_fingerprint_data(&ds, "pixels/255", d0);
    kd_cache_fingerprint_data(&ds, "pixels/255", d1);
    CHECK(strcmp(d0, d1) == 0);
    pixels[17] ^= 1;
    kd_cache_fingerprint_data(&ds, "pixels/255", d1);
    CHECK(strcmp(d0, d1) != 0);
    pixels[17] ^= 1;
    labels[3] = 2;
    kd_cache_fingerprint_data(&ds, "pixels/255", d1);
    CHECK(strcmp(d0, d1) != 0);
    labels[3] = 1;
    kd_cache_fingerprint_data(&ds, "pixels/255; val=1", d1);
    CHECK(strcmp(d0, d1) != 0);
    ds.height = 4, ds.width = 1; /* same bytes, other shape */
    kd_cache_fingerprint_data(&ds, "pixels/255", d1);
    CHECK(strcmp(d0, d1) != 0);
    kd_cache_fingerprint_import("hf-teacher", d0);
    kd_cache_fingerprint_import("hf-teacher2", d1);
    CHECK(strcmp(d0, d1) != 0);
}

/* ---- export, import, ls, gc ------------------------------------------------------------------ */

static void test_export_import(void) {
    const size_t N = 1000, R = 128;
    const int C = 10;
    const char *root = tmp_path("xport");
    float *x = make_logits(N, C, 41);
    kd_cache_key_t key = make_key("t", "d", N, C, KD_ENC_INT8, 0, R);
    kd_cache_t *c = open_or_die(root, &key);
    char err[KD_ERR_LEN], npy[2048];
    snprintf(npy, sizeof npy, "%s", tmp_path("export.npy"));
    CHECK(kd_cache_put_block(c, 0, x, err, sizeof err) == 0);
    CHECK(kd_cache_export_npy(c, npy, err, sizeof err) == -1); /* incomplete */
    CHECK_ERR_HAS(err, "incomplete");
    CHECK_ERR_HAS(err, "block 1,");
    CHECK(!kd_file_exists(npy));
    CHECK(put_all(c, x) == 0);
    CHECK(kd_cache_export_npy(c, npy, err, sizeof err) == 0);
    float *got = NULL, *y = malloc(N * C * sizeof(float));
    size_t rows = 0, cols = 0;
    CHECK(kd_npy_read_f32(npy, &got, &rows, &cols, err, sizeof err) == 0);
    CHECK(rows == N && cols == (size_t)C);
    CHECK(get_all(c, y) == kd_cache_blocks(c));
    CHECK(got && same_bits(got, y, N * C)); /* export is what get decodes */
    if (got) check_int8(x, got, N, C);
    free(got);
    kd_cache_close(&c);

    /* Import: logits from elsewhere become teacher "import:hf-teacher". */
    snprintf(npy, sizeof npy, "%s", tmp_path("import.npy"));
    CHECK(kd_npy_write_f32(npy, x, N, (size_t)C, err, sizeof err) == 0);
    char name[KD_CACHE_NAME_MAX] = "";
    CHECK(kd_cache_import_npy(root, npy, key.data_fp, "hf-teacher", KD_ENC_FP16, 0, 0, name,
                              sizeof name, err, sizeof err) == 0);
    kd_cache_key_t ikey = make_key("x", "d", N, C, KD_ENC_FP16, 0, 0);
    kd_cache_fingerprint_import("hf-teacher", ikey.teacher_fp);
    char want_name[KD_CACHE_NAME_MAX];
    snprintf(want_name, sizeof want_name, "%s-%s/fp16", ikey.teacher_fp, key.data_fp);
    CHECK(strcmp(name, want_name) == 0);
    c = open_or_die(root, &ikey);
    CHECK(kd_cache_imported(c));
    CHECK(strcmp(kd_cache_key(c)->teacher_desc, "import:hf-teacher") == 0);
    CHECK(kd_cache_block_rows(c) == KD_CACHE_DEFAULT_BLOCK_ROWS);
    CHECK(get_all(c, y) == kd_cache_blocks(c));
    check_fp16(x, y, N * C);
    kd_cache_close(&c);
    CHECK(kd_cache_import_npy(root, npy, key.data_fp, "hf-teacher", KD_ENC_FP16, 0, 0, NULL, 0, err,
                              sizeof err) == -1);
    CHECK_ERR_HAS(err, "already holds");
    CHECK(kd_cache_import_npy(root, npy, key.data_fp, "hf-topk", KD_ENC_TOPK, 4, 100, NULL, 0, err,
                              sizeof err) == 0);
    kd_cache_key_t tkey = make_key("x", "d", N, C, KD_ENC_TOPK, 4, 0);
    kd_cache_fingerprint_import("hf-topk", tkey.teacher_fp);
    c = open_or_die(root, &tkey);
    CHECK(kd_cache_block_rows(c) == 100); /* the entry's own block size wins */
    CHECK(get_all(c, y) == kd_cache_blocks(c));
    check_topk(x, y, N, C, 4);
    kd_cache_close(&c);

    /* Bad imports leave nothing behind. */
    x[3 * C + 4] = INFINITY;
    CHECK(kd_npy_write_f32(npy, x, N, (size_t)C, err, sizeof err) == 0);
    CHECK(kd_cache_import_npy(root, npy, key.data_fp, "bad", KD_ENC_FP32, 0, 0, NULL, 0, err,
                              sizeof err) == -1);
    CHECK_ERR_HAS(err, "row 3 column 4");
    CHECK(kd_cache_import_npy(root, npy, "XYZ", "bad", KD_ENC_FP32, 0, 0, NULL, 0, err,
                              sizeof err) == -1);
    CHECK_ERR_HAS(err, "XYZ");
    CHECK(kd_cache_import_npy(root, tmp_path("nope.npy"), key.data_fp, "bad", KD_ENC_FP32, 0, 0,
                              NULL, 0, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "nope.npy");
    kd_cache_entry_info_t *list;
    size_t n;
    CHECK(kd_cache_list(root, &list, &n, err, sizeof err) == 0);
    CHECK(n == 3); /* int8, imported fp16, imported topk4 */
    for (size_t i = 0; i < n; i++) CHECK(list[i].ok && list[i].blocks_written == list[i].blocks);
    free(list);
    free(x);
    free(y);
}

static void set_manifest_field(const char *manifest, const char *field, json_t *value) {
    json_error_t je;
    json_t *m = json_load_file(manifest, 0, &je);
    if (!m) exit(1);
    if (value)
        json_object_set_new(m, field, value);
    else
        json_object_del(m, field);
    if (json_dump_file(m, manifest, JSON_INDENT(2)) != 0) exit(1);
    json_decref(m);
}

static void removed_name(void *user, const char *name) {
    (void)name;
    ++*(int *)user;
}

static void test_ls_gc(void) {
    const char *root = tmp_path("gc");
    char err[KD_ERR_LEN];
    float *x = make_logits(300, 10, 51);
    kd_cache_key_t keys[3] = {make_key("a", "d", 300, 10, KD_ENC_FP32, 0, 100),
                              make_key("a", "d", 300, 10, KD_ENC_TOPK, 2, 100),
                              make_key("b", "d", 300, 10, KD_ENC_FP16, 0, 100)};
    for (int i = 0; i < 3; i++) {
        kd_cache_t *c = open_or_die(root, &keys[i]);
        CHECK(kd_cache_put_block(c, 0, x, err, sizeof err) == 0);
        if (i == 0) CHECK(put_all(c, x) == 0);
        kd_cache_close(&c);
    }
    kd_cache_entry_info_t *list;
    size_t n;
    CHECK(kd_cache_list(root, &list, &n, err, sizeof err) == 0 && n == 3);
    for (size_t i = 0; i < n; i++) {
        CHECK(list[i].ok && list[i].blocks == 3 && list[i].bytes > 0);
        CHECK(list[i].blocks_written == (list[i].key.encoding == KD_ENC_FP32 ? 3u : 1u));
        CHECK(fabs(list[i].created - kd_wall_time()) < 600);
    }
    for (size_t i = 0; i + 1 < n; i++) CHECK(strcmp(list[i].name, list[i + 1].name) < 0);
    free(list);

    /* An old entry: only it goes with --older-than. */
    char manifest[3000], pair[128];
    snprintf(pair, sizeof pair, "%s-%s", keys[2].teacher_fp, keys[2].data_fp);
    snprintf(manifest, sizeof manifest, "%s/%s/fp16/manifest.json", root, pair);
    set_manifest_field(manifest, "created_unix", json_integer((json_int_t)time(NULL) - 10 * 86400));
    size_t removed = 0;
    int seen = 0;
    CHECK(kd_cache_gc(root, NULL, 5, removed_name, &seen, &removed, err, sizeof err) == 0);
    CHECK(removed == 1 && seen == 1);
    snprintf(manifest, sizeof manifest, "%s/%s", root, pair);
    CHECK(!kd_file_exists(manifest)); /* the emptied pair directory went too */

    /* By prefix: both encodings of teacher a. */
    snprintf(pair, sizeof pair, "%s-", keys[0].teacher_fp);
    CHECK(kd_cache_gc(root, pair, -1, NULL, NULL, &removed, err, sizeof err) == 0 && removed == 2);
    CHECK(kd_cache_list(root, &list, &n, err, sizeof err) == 0 && n == 0);
    free(list);
    CHECK(count_dir_entries(root, "[0-9a-f]") == 0);
    /* A missing cache directory is an empty cache. */
    CHECK(kd_cache_list(tmp_path("no-such-cache"), &list, &n, err, sizeof err) == 0 && n == 0);
    free(x);
}

/* ---- malformed entries ----------------------------------------------------------------------- */

/* Opening the entry (both ways) fails with an error naming `file` and containing `what`. */
static void expect_open_error(const char *root, const kd_cache_key_t *key, const char *file,
                              const char *what) {
    char err[KD_ERR_LEN] = "", dir[2048];
    kd_cache_t *c = kd_cache_open(root, key, err, sizeof err);
    CHECK(c == NULL);
    CHECK_ERR_HAS(err, file);
    CHECK_ERR_HAS(err, what);
    kd_cache_close(&c);
    snprintf(dir, sizeof dir, "%s/%s-%s/fp32", root, key->teacher_fp, key->data_fp);
    c = kd_cache_open_entry(dir, err, sizeof err);
    CHECK(c == NULL);
    CHECK_ERR_HAS(err, file);
    kd_cache_close(&c);
    kd_cache_entry_info_t *list;
    size_t n;
    CHECK(kd_cache_list(root, &list, &n, err, sizeof err) == 0 && n == 1);
    if (n == 1) {
        CHECK(!list[0].ok);
        CHECK_ERR_HAS(list[0].error, what);
    }
    free(list);
}

static void test_malformed(void) {
    const char *root = tmp_path("bad");
    char err[KD_ERR_LEN], manifest[2048], data[2048], saved_path[2048];
    kd_cache_key_t key = make_key("t", "d", 300, 10, KD_ENC_FP32, 0, 100);
    kd_cache_t *c = open_or_die(root, &key);
    float *x = make_logits(300, 10, 61);
    CHECK(put_all(c, x) == 0);
    snprintf(manifest, sizeof manifest, "%s/manifest.json", kd_cache_dir(c));
    snprintf(data, sizeof data, "%s/logits.bin", kd_cache_dir(c));
    kd_cache_close(&c);
    uint8_t *saved;
    size_t saved_len;
    CHECK(kd_read_file(manifest, &saved, &saved_len, err, sizeof err) == 0);
    snprintf(saved_path, sizeof saved_path, "%s", manifest);
#define RESTORE() CHECK(kd_write_file_atomic(saved_path, saved, saved_len, err, sizeof err) == 0)

    CHECK(kd_write_file_atomic(manifest, "{\"format\": ", 11, err, sizeof err) == 0);
    expect_open_error(root, &key, manifest, "not valid JSON");
    CHECK(kd_write_file_atomic(manifest, "[1, 2]", 6, err, sizeof err) == 0);
    expect_open_error(root, &key, manifest, "not a JSON object");
    RESTORE();
    set_manifest_field(manifest, "n_classes", NULL);
    expect_open_error(root, &key, manifest, "field 'n_classes' is missing");
    RESTORE();
    set_manifest_field(manifest, "n_classes", json_string("ten"));
    expect_open_error(root, &key, manifest, "field 'n_classes' must be an integer");
    RESTORE();
    set_manifest_field(manifest, "encoding", json_string("bf16"));
    expect_open_error(root, &key, manifest, "field 'encoding'");
    RESTORE();
    set_manifest_field(manifest, "n_classes", json_integer(12));
    expect_open_error(root, &key, manifest, "field 'record_bytes'");
    set_manifest_field(manifest, "record_bytes", json_integer(48));
    expect_open_error(root, &key, data, "n_classes is 10 but");
    RESTORE();
    set_manifest_field(manifest, "version", json_integer(2)); /* topk's: its records changed */
    expect_open_error(root, &key, manifest, "fp32 entry in format version 2");
    RESTORE();
    set_manifest_field(manifest, "format", json_string("something-else"));
    expect_open_error(root, &key, manifest, "field 'format'");
    RESTORE();
    set_manifest_field(manifest, "data_fingerprint", json_string("0123"));
    expect_open_error(root, &key, manifest, "data fingerprint");
    RESTORE();

    /* The key asked for must match the entry. */
    kd_cache_key_t other = key;
    other.n_samples = 301;
    c = kd_cache_open(root, &other, err, sizeof err);
    CHECK(c == NULL);
    CHECK_ERR_HAS(err, manifest);
    CHECK_ERR_HAS(err, "field 'n_samples' is 300");
    kd_cache_close(&c);

    /* Data file: too long, header damaged, missing. */
    off_t len = file_size(data);
    write_bytes(data, len, "xx", 2);
    expect_open_error(root, &key, data, "more than the");
    CHECK(truncate(data, len) == 0);
    flip_byte(data, 20);
    expect_open_error(root, &key, data, "header checksum");
    flip_byte(data, 20);
    flip_byte(data, 0);
    expect_open_error(root, &key, data, "bad magic");
    flip_byte(data, 0);
    CHECK(truncate(data, 30) == 0);
    expect_open_error(root, &key, data, "shorter than");
    CHECK(unlink(data) == 0);
    expect_open_error(root, &key, data, "cannot open");
    CHECK(unlink(manifest) == 0);
    expect_open_error(root, &key, manifest, "missing");

    /* Bad keys. */
    other = key;
    other.encoding = KD_ENC_TOPK, other.k = 11;
    CHECK(kd_cache_open(root, &other, err, sizeof err) == NULL);
    CHECK_ERR_HAS(err, "k in 1..n_classes");
    other = key;
    snprintf(other.teacher_fp, sizeof other.teacher_fp, "not-hex");
    CHECK(kd_cache_open(root, &other, err, sizeof err) == NULL);
    CHECK_ERR_HAS(err, "teacher fingerprint 'not-hex'");
    kd_cache_encoding_t e;
    int k;
    CHECK(kd_cache_encoding_parse("topk16", &e, &k) == 0 && e == KD_ENC_TOPK && k == 16);
    CHECK(kd_cache_encoding_parse("int8", &e, &k) == 0 && e == KD_ENC_INT8 && k == 0);
    CHECK(kd_cache_encoding_parse("fp16x", &e, &k) == -1);
    CHECK(kd_cache_encoding_parse("topk0", &e, &k) == -1);
    CHECK(kd_cache_encoding_from_name("fp16", &e) == 0 && e == KD_ENC_FP16);
    CHECK(kd_cache_encoding_from_name("topk16", &e) == -1);
    for (int i = 0; i < KD_ENC_COUNT; i++)
        CHECK(kd_cache_encoding_from_name(kd_cache_encoding_name((kd_cache_encoding_t)i), &e) ==
                  0 &&
              e == (kd_cache_encoding_t)i);
    free(saved);
    free(x);
#undef RESTORE
}

int main(void) {
    tmp = kd_test_tmpdir("test_cache");
    double t0 = kd_now();
    test_encoding(KD_ENC_FP32, 0);
    test_encoding(KD_ENC_FP16, 0);
    test_encoding(KD_ENC_INT8, 0);
    test_encoding(KD_ENC_TOPK, 3);
    test_encoding(KD_ENC_TOPK, 1);
    test_encoding(KD_ENC_TOPK, 10); /* k = C: nothing left over */
    test_fp16_half_size();
    test_torn_blocks();
    test_sparse_holes();
    test_fingerprints();
    test_export_import();
    test_ls_gc();
    test_malformed();
    test_crashed_creation();
    test_concurrent_writers();
    test_killed_writer();
    test_claims();
    fprintf(stderr, "test_cache: %.2f s\n", kd_now() - t0);
    if (!kd_test_failures) {
        char cmd[1100];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", tmp);
    }
    return kd_test_done("test_cache");
}
