/* test_teacher_logits: the teacher node's logits for the training split (teacher_node/logits.h)
 * against a direct teacher forward pass, through the persistent cache: reuse without a forward
 * pass, a new entry for new weights, on-demand rows equal to cached ones in every encoding, a
 * corrupted block recomputed, two processes sharing the work of one entry, and imported
 * logits served without a model. The teacher is the PyTorch-made MLP of tests/data. */
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kd_cache.h"
#include "kd_checkpoint.h"
#include "kd_log.h"
#include "kd_npy.h"
#include "kd_recipe.h"
#include "kd_test.h"
#include "kd_util.h"
#include "logits.h"

#define N_SAMPLES   1000 /* 4 cache blocks of 256 rows, the last one short */
#define TEACHER_BS  64   /* 4 forward passes per block, the last one padded */
#define BLOCK_ROWS  KD_CACHE_DEFAULT_BLOCK_ROWS
#define N_BLOCKS    ((N_SAMPLES + BLOCK_ROWS - 1) / BLOCK_ROWS)
#define C           10
#define D           784
#define DEADLINE    60.0 /* seconds for any fill; they take well under one */
#define FIXTURE_MLP "data/mlp_small.safetensors"

static const char *tmp;
static kd_dataset_t *train;
static float *reference; /* (N, C) the teacher's logits, computed here directly */

/* nn.Sequential(Flatten, Linear(784, 32), ReLU, Linear(32, 10)), as in test_checkpoint.c */
static const kd_layer_spec_t MLP[] = {
    {.kind = KD_LAYER_FLATTEN},
    {.kind = KD_LAYER_LINEAR, .out_features = 32},
    {.kind = KD_LAYER_RELU},
    {.kind = KD_LAYER_LINEAR, .out_features = 10},
};

static const char *path_in_tmp(const char *name) {
    static char path[4][2048];
    static int turn = 0;
    turn = (turn + 1) % 4;
    snprintf(path[turn], sizeof path[turn], "%s/%s", tmp, name);
    return path[turn];
}

static void die(const char *what, const char *err) {
    fprintf(stderr, "%s: %s\n", what, err);
    exit(1);
}

/* n 1x28x28 images of pseudo-random bytes, labels 0..9. */
static kd_dataset_t *make_dataset(size_t n) {
    kd_dataset_t *ds = kd_xcalloc(1, sizeof *ds);
    ds->n = n;
    ds->channels = 1;
    ds->height = ds->width = 28;
    ds->sample_dim = D;
    ds->num_classes = C;
    ds->pixels = kd_xmalloc(n * D);
    ds->labels = kd_xmalloc(n * sizeof *ds->labels);
    uint64_t s = 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < n * D; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        ds->pixels[i] = (uint8_t)(s >> 24);
    }
    for (size_t i = 0; i < n; i++) ds->labels[i] = (int32_t)(i % C);
    return ds;
}

static kd_model_t *load_mlp(const char *path) {
    char err[KD_ERR_LEN];
    kd_model_t *m = NULL;
    kd_shape_t in = {1, 28, 28};
    if (kd_model_new(MLP, 4, in, &m, err, sizeof err) != 0) die("kd_model_new", err);
    if (kd_checkpoint_load(m, path, err, sizeof err) != 0) die("kd_checkpoint_load", err);
    return m;
}

/* The teacher's logits of every sample of ds computed directly with kd_model_forward, in the
 * batches the module promises to reproduce: TEACHER_BS consecutive samples of a cache block,
 * the block's last pass padded with zero images. */
static float *direct_logits(kd_model_t *m, const kd_dataset_t *ds) {
    const size_t N = ds->n;
    float *out = kd_xmalloc(N * C * sizeof(float));
    float *x = kd_xcalloc((size_t)TEACHER_BS * D, sizeof(float));
    for (size_t b0 = 0; b0 < N; b0 += BLOCK_ROWS)
        for (size_t lo = b0; lo < b0 + BLOCK_ROWS && lo < N; lo += TEACHER_BS) {
            size_t n = b0 + BLOCK_ROWS < N ? b0 + BLOCK_ROWS - lo : N - lo;
            if (n > TEACHER_BS) n = TEACHER_BS;
            memset(x, 0, (size_t)TEACHER_BS * D * sizeof(float));
            kd_pixels_to_float(ds->pixels + lo * D, n * D, x);
            const float *y = kd_model_forward(m, x, TEACHER_BS, false, 0);
            memcpy(out + lo * C, y, n * C * sizeof(float));
        }
    free(x);
    return out;
}

static void base_recipe(kd_recipe_t *r, const char *cache_dir, const char *checkpoint) {
    kd_recipe_defaults(r);
    r->teacher.n_layers = 4;
    memcpy(r->teacher.layers, MLP, sizeof MLP);
    snprintf(r->teacher.checkpoint, sizeof r->teacher.checkpoint, "%s", checkpoint);
    r->teacher.batch_size = TEACHER_BS;
    snprintf(r->cache.dir, sizeof r->cache.dir, "%s", cache_dir);
    r->cache.encoding = KD_ENC_FP32;
    r->cache.topk = 5;
    r->cache.import[0] = 0;
}

static teacher_logits_t *open_on(const kd_recipe_t *r, const kd_dataset_t *ds) {
    char err[KD_ERR_LEN] = "";
    teacher_logits_t *tl = teacher_logits_open(r, ds, err, sizeof err);
    if (!tl) die("teacher_logits_open", err);
    return tl;
}

static teacher_logits_t *open_or_die(const kd_recipe_t *r) {
    return open_on(r, train);
}

/* Polls for completion with a deadline; false when the fill failed or took too long. */
static bool wait_complete(teacher_logits_t *tl) {
    char err[KD_ERR_LEN];
    double end = kd_now() + DEADLINE;
    while (!teacher_logits_complete(tl)) {
        if (teacher_logits_failed(tl, err, sizeof err)) {
            fprintf(stderr, "fill failed: %s\n", err);
            return false;
        }
        if (kd_now() > end) return false;
        usleep(1000);
    }
    return true;
}

static void fill_and_wait(teacher_logits_t *tl) {
    char err[KD_ERR_LEN] = "";
    CHECK(teacher_logits_start_fill(tl, 0, 1, err, sizeof err) == 0);
    CHECK(wait_complete(tl));
}

/* Every one of n samples in a shuffled order, fetched in batches of `batch`, into out (n, C) by
 * id. */
static int get_n(teacher_logits_t *tl, size_t n, size_t batch, float *out) {
    uint32_t *ids = kd_xmalloc(n * sizeof *ids);
    for (size_t i = 0; i < n; i++)
        ids[i] = (uint32_t)(i * 7919u % n); /* n is not a multiple of 7919 */
    float *rows = kd_xmalloc(batch * C * sizeof(float));
    char err[KD_ERR_LEN] = "";
    int rc = 0;
    for (size_t lo = 0; lo < n && rc == 0; lo += batch) {
        size_t m = n - lo < batch ? n - lo : batch;
        rc = teacher_logits_get(tl, ids + lo, m, rows, err, sizeof err);
        if (rc != 0) fprintf(stderr, "teacher_logits_get: %s\n", err);
        for (size_t j = 0; j < m && rc == 0; j++)
            memcpy(out + (size_t)ids[lo + j] * C, rows + j * C, C * sizeof(float));
    }
    free(rows);
    free(ids);
    return rc;
}

static int get_all(teacher_logits_t *tl, size_t batch, float *out) {
    return get_n(tl, N_SAMPLES, batch, out);
}

static bool same_bits(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

static teacher_logits_stats_t stats_of(const teacher_logits_t *tl) {
    teacher_logits_stats_t s;
    teacher_logits_stats(tl, &s);
    return s;
}

/* ---- fp32: fill, reuse, a new teacher ------------------------------------------------------ */

static void test_reference_is_the_teacher(void) {
    /* The chunked reference is the plain forward pass up to float rounding. */
    kd_model_t *m = load_mlp(FIXTURE_MLP);
    float *x = kd_xmalloc((size_t)N_SAMPLES * D * sizeof(float));
    kd_pixels_to_float(train->pixels, (size_t)N_SAMPLES * D, x);
    const float *all = kd_model_forward(m, x, N_SAMPLES, false, 0);
    double worst = 0;
    for (size_t i = 0; i < (size_t)N_SAMPLES * C; i++)
        worst = fmax(worst, fabs((double)all[i] - reference[i]));
    CHECK(worst < 1e-5);
    fprintf(stderr, "  chunked reference vs one forward pass: max |diff| %.2g\n", worst);
    free(x);
    kd_model_destroy(&m);
}

static void test_fill_then_reuse(void) {
    const char *dir = path_in_tmp("cache-a");
    kd_recipe_t r;
    base_recipe(&r, dir, FIXTURE_MLP);
    float *got = kd_xmalloc((size_t)N_SAMPLES * C * sizeof(float));

    teacher_logits_t *tl = open_or_die(&r);
    CHECK(teacher_logits_classes(tl) == C);
    CHECK(!teacher_logits_complete(tl));
    double t0 = kd_now();
    fill_and_wait(tl);
    double fill_s = kd_now() - t0;
    teacher_logits_stats_t s = stats_of(tl);
    CHECK(s.cache_misses == N_BLOCKS && s.cache_hits == 0 && s.cache_corrupt == 0);
    CHECK(s.forward_samples == N_SAMPLES && s.on_demand_samples == 0);
    CHECK(s.forward_batches == N_BLOCKS * (BLOCK_ROWS / TEACHER_BS));
    CHECK(get_all(tl, 64, got) == 0);
    CHECK(same_bits(got, reference, (size_t)N_SAMPLES * C));
    CHECK(stats_of(tl).forward_samples == N_SAMPLES); /* served from the table */
    char entry[KD_CACHE_NAME_MAX];
    snprintf(entry, sizeof entry, "%s", teacher_logits_entry(tl));
    teacher_logits_close(&tl);
    CHECK(tl == NULL);
    teacher_logits_close(&tl); /* NULL-safe */

    /* Same teacher, same data: everything from the cache, no forward pass. */
    tl = open_or_die(&r);
    CHECK(strcmp(teacher_logits_entry(tl), entry) == 0);
    t0 = kd_now();
    fill_and_wait(tl);
    double reuse_s = kd_now() - t0;
    s = stats_of(tl);
    CHECK(s.forward_samples == 0 && s.forward_batches == 0);
    CHECK(s.cache_hits == N_BLOCKS && s.cache_misses == 0 && s.cache_corrupt == 0);
    memset(got, 0, (size_t)N_SAMPLES * C * sizeof(float));
    CHECK(get_all(tl, 100, got) == 0);
    CHECK(same_bits(got, reference, (size_t)N_SAMPLES * C));
    teacher_logits_close(&tl);
    /* No fill started: get reads the blocks another node cached, and keeps them. */
    tl = open_or_die(&r);
    memset(got, 0, (size_t)N_SAMPLES * C * sizeof(float));
    CHECK(get_all(tl, 64, got) == 0);
    CHECK(same_bits(got, reference, (size_t)N_SAMPLES * C));
    s = stats_of(tl);
    CHECK(s.forward_samples == 0 && s.cache_hits == N_BLOCKS);
    CHECK(teacher_logits_complete(tl));
    teacher_logits_close(&tl);
    fprintf(stderr, "  fp32: fill %.3f s (%d forward samples), reuse %.3f s (0 forward)\n", fill_s,
            N_SAMPLES, reuse_s);

    /* One weight one ulp off: another teacher, another entry, computed again. */
    kd_model_t *m = load_mlp(FIXTURE_MLP);
    m->params[m->n_params / 2] = nextafterf(m->params[m->n_params / 2], INFINITY);
    char err[KD_ERR_LEN] = "";
    const char *ckpt = path_in_tmp("mlp_changed.safetensors");
    CHECK(kd_checkpoint_save(m, ckpt, err, sizeof err) == 0);
    kd_recipe_t r2;
    base_recipe(&r2, dir, ckpt);
    tl = open_or_die(&r2);
    CHECK(strcmp(teacher_logits_entry(tl), entry) != 0);
    /* Same data fingerprint (after "<teacher_fp>-"), other teacher fingerprint. */
    CHECK(strcmp(teacher_logits_entry(tl) + KD_CACHE_FP_HEX, entry + KD_CACHE_FP_HEX) == 0);
    fill_and_wait(tl);
    s = stats_of(tl);
    CHECK(s.cache_misses == N_BLOCKS && s.cache_hits == 0 && s.forward_samples == N_SAMPLES);
    teacher_logits_close(&tl);
    kd_cache_entry_info_t *list = NULL;
    size_t n = 0;
    CHECK(kd_cache_list(dir, &list, &n, err, sizeof err) == 0);
    CHECK(n == 2);
    for (size_t i = 0; i < n; i++) CHECK(list[i].ok && list[i].blocks_written == N_BLOCKS);
    free(list);
    kd_model_destroy(&m);
    free(got);
}

/* ---- rows served before the fill ----------------------------------------------------------- */

static void test_on_demand(void) {
    kd_recipe_t r;
    base_recipe(&r, path_in_tmp("cache-b"), FIXTURE_MLP);
    float *got = kd_xmalloc((size_t)N_SAMPLES * C * sizeof(float));

    /* No fill at all: every row computed now, each in its slot. */
    teacher_logits_t *tl = open_or_die(&r);
    CHECK(get_all(tl, 50, got) == 0);
    CHECK(same_bits(got, reference, (size_t)N_SAMPLES * C));
    teacher_logits_stats_t s = stats_of(tl);
    CHECK(s.on_demand_samples == N_SAMPLES && s.forward_samples == N_SAMPLES);
    CHECK(!teacher_logits_complete(tl));
    fprintf(stderr, "  on demand, batches of 50: %llu forward passes of %d rows for %d samples\n",
            (unsigned long long)s.forward_batches, TEACHER_BS, N_SAMPLES);
    /* A batch with one sample twice and ids out of range. */
    uint32_t twice[3] = {5, 700, 5};
    float rows[3 * C];
    char err[KD_ERR_LEN] = "";
    CHECK(teacher_logits_get(tl, twice, 3, rows, err, sizeof err) == 0);
    CHECK(same_bits(rows, reference + 5 * C, C) && same_bits(rows + 2 * C, reference + 5 * C, C));
    CHECK(same_bits(rows + C, reference + 700 * C, C));
    uint32_t bad[2] = {1, N_SAMPLES};
    CHECK(teacher_logits_get(tl, bad, 2, rows, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "sample id 1000 out of range");
    CHECK(teacher_logits_get(tl, bad, 0, rows, err, sizeof err) == 0);
    teacher_logits_close(&tl); /* never started: nothing to join */

    /* While the fill runs: whatever serves each row, the bits are the teacher's. */
    tl = open_or_die(&r); /* the entry is still empty: nothing was put */
    CHECK(teacher_logits_start_fill(tl, 0, 1, err, sizeof err) == 0);
    CHECK(teacher_logits_start_fill(tl, 0, 1, err, sizeof err) == -1);
    int rounds = 0;
    bool all_same = true;
    while (!teacher_logits_complete(tl) && rounds < 1000) {
        memset(got, 0, (size_t)N_SAMPLES * C * sizeof(float));
        CHECK(get_all(tl, 64, got) == 0);
        all_same = all_same && same_bits(got, reference, (size_t)N_SAMPLES * C);
        rounds++;
    }
    CHECK(all_same);
    CHECK(wait_complete(tl));
    CHECK(get_all(tl, 64, got) == 0);
    CHECK(same_bits(got, reference, (size_t)N_SAMPLES * C));
    s = stats_of(tl);
    fprintf(stderr,
            "  during the fill: %d full passes over the split, %llu rows on demand, %llu by "
            "the fill; %llu blocks loaded from the cache\n",
            rounds, (unsigned long long)s.on_demand_samples,
            (unsigned long long)(s.forward_samples - s.on_demand_samples),
            (unsigned long long)s.cache_hits);
    teacher_logits_close(&tl);
    free(got);
}

/* ---- lossy encodings: the decoded values, whichever path ----------------------------------- */

/* True when f is exactly a half-precision value (normal or subnormal). */
static bool is_half(float f) {
    float a = fabsf(f);
    if (a == 0) return true;
    if (a > 65504.0f) return false;
    if (a < 6.103515625e-05f) return fmodf(a * 16777216.0f, 1.0f) == 0; /* k * 2^-24 */
    uint32_t u;
    memcpy(&u, &a, sizeof u);
    return (u & 0x1fffu) == 0;
}

static void test_lossy(kd_cache_encoding_t enc, int k) {
    char name[64];
    snprintf(name, sizeof name, "cache-%s", kd_cache_encoding_name(enc));
    if (enc == KD_ENC_TOPK) snprintf(name, sizeof name, "cache-topk%d", k);
    kd_recipe_t r;
    base_recipe(&r, path_in_tmp(name), FIXTURE_MLP);
    r.cache.encoding = enc;
    r.cache.topk = k;
    size_t NC = (size_t)N_SAMPLES * C;
    float *on_demand = kd_xmalloc(NC * sizeof(float)), *filled = kd_xmalloc(NC * sizeof(float)),
          *cached = kd_xmalloc(NC * sizeof(float)), *file = kd_xmalloc(NC * sizeof(float));

    teacher_logits_t *tl = open_or_die(&r);
    CHECK(get_all(tl, 64, on_demand) == 0); /* before the fill: computed, then the codec */
    fill_and_wait(tl);
    CHECK(get_all(tl, 64, filled) == 0);
    teacher_logits_close(&tl);
    tl = open_or_die(&r);
    fill_and_wait(tl);
    CHECK(stats_of(tl).forward_samples == 0 && stats_of(tl).cache_hits == N_BLOCKS);
    CHECK(get_all(tl, 64, cached) == 0);
    /* The entry on disk decodes to the same values. */
    char dir[2048], err[KD_ERR_LEN] = "";
    snprintf(dir, sizeof dir, "%s/%s", r.cache.dir, teacher_logits_entry(tl));
    teacher_logits_close(&tl);
    kd_cache_t *c = kd_cache_open_entry(dir, err, sizeof err);
    CHECK(c != NULL);
    for (size_t b = 0; c && b < N_BLOCKS; b++)
        CHECK(kd_cache_get_block(c, b, file + b * BLOCK_ROWS * C, err, sizeof err) == KD_CACHE_HIT);
    kd_cache_close(&c);

    CHECK(same_bits(on_demand, filled, NC));
    CHECK(same_bits(on_demand, cached, NC));
    CHECK(same_bits(on_demand, file, NC));
    CHECK(!same_bits(on_demand, reference, NC)); /* the codec did change them */
    bool codec_values = true;
    double worst = 0;
    for (size_t i = 0; i < NC; i++) {
        if (enc == KD_ENC_FP16) {
            codec_values = codec_values && is_half(on_demand[i]);
            worst = fmax(worst, fabs(on_demand[i] - reference[i]) /
                                    fmax(fabs(reference[i]), 6.103515625e-05));
        }
        if (enc == KD_ENC_INT8) worst = fmax(worst, fabs(on_demand[i] - reference[i]));
    }
    if (enc == KD_ENC_TOPK) /* the largest logit of a row exact, the next k - 1 within half an
                               fp16 step of their difference to it */
        for (size_t row = 0; row < N_SAMPLES; row++) {
            const float *ref = reference + row * C, *got = on_demand + row * C;
            float top = ref[0];
            for (int j = 1; j < C; j++) top = fmaxf(top, ref[j]);
            int exact = 0, close = 0;
            for (int j = 0; j < C; j++) {
                exact += got[j] == ref[j] && ref[j] == top;
                close += fabsf(got[j] - ref[j]) <=
                         fabsf(ref[j] - top) / 2048 + 2 * FLT_EPSILON * fabsf(top);
            }
            codec_values = codec_values && exact >= 1 && close >= k;
        }
    CHECK(codec_values);
    if (enc == KD_ENC_FP16) CHECK(worst <= 1.0 / 2048); /* half: 11 significant bits */
    if (enc == KD_ENC_INT8) CHECK(worst < 0.05);        /* scale/2 on these small rows */
    fprintf(stderr, "  %s: on demand = filled = reloaded = on disk (%zu values); max err %.2g\n",
            name + strlen("cache-"), NC, worst);
    free(on_demand);
    free(filled);
    free(cached);
    free(file);
}

static void test_roundtrip_refusals(void) {
    char err[KD_ERR_LEN] = "";
    float in[2 * C] = {0}, out[2 * C];
    in[C + 3] = NAN;
    CHECK(kd_cache_roundtrip_rows(KD_ENC_FP16, 0, C, 1, in, out, err, sizeof err) == 0);
    CHECK(kd_cache_roundtrip_rows(KD_ENC_FP16, 0, C, 2, in, out, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "row 1 class 3 is nan");
    CHECK(kd_cache_roundtrip_rows(KD_ENC_TOPK, C + 1, C, 1, in, out, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "topk needs k in 1..n_classes (10), not 11");
    in[0] = 1.0f / 3;
    CHECK(kd_cache_roundtrip_rows(KD_ENC_FP32, 0, C, 1, in, out, err, sizeof err) == 0);
    CHECK(same_bits(in, out, C));
    CHECK(kd_cache_roundtrip_rows(KD_ENC_FP16, 0, C, 1, in, in, err, sizeof err) ==
          0); /* in place */
    CHECK(in[0] == 0.333251953125f);
}

/* ---- a corrupted block ---------------------------------------------------------------------- */

/* Runs fn with stderr going to path (the log lines it writes), then restores stderr. */
static void capture_stderr(const char *path, void (*fn)(void *), void *arg) {
    fflush(stderr);
    int saved = dup(2);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (saved < 0 || fd < 0) die("capture_stderr", path);
    dup2(fd, 2);
    close(fd);
    fn(arg);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
}

static void fill_in(void *arg) {
    fill_and_wait(arg);
}

struct get_all_args {
    teacher_logits_t *tl;
    float *out;
    int rc;
};

static void get_all_in(void *arg) {
    struct get_all_args *a = arg;
    a->rc = get_all(a->tl, 64, a->out);
}

/* The log names the data file, the block, the problem and what is done about it. */
static void check_log_has(const char *log, const char *data_file, const char *action) {
    uint8_t *text = NULL;
    size_t len = 0;
    char err[KD_ERR_LEN] = "";
    CHECK(kd_read_file(log, &text, &len, err, sizeof err) == 0);
    if (!text) return;
    CHECK_ERR_HAS((char *)text, "WARN  TEACHER-CACHE-CORRUPT");
    CHECK_ERR_HAS((char *)text, data_file);
    CHECK_ERR_HAS((char *)text, "block 1 (samples 256..511)");
    CHECK_ERR_HAS((char *)text, "checksum mismatch");
    CHECK_ERR_HAS((char *)text, action);
    free(text);
}

static void test_corrupt_block(void) {
    kd_recipe_t r;
    base_recipe(&r, path_in_tmp("cache-a"), FIXTURE_MLP); /* filled by test_fill_then_reuse */
    teacher_logits_t *tl = open_or_die(&r);
    char data[2048];
    snprintf(data, sizeof data, "%s/%s/logits.bin", r.cache.dir, teacher_logits_entry(tl));
    teacher_logits_close(&tl);
    /* One payload byte of block 1 (file header 64 B, block header 32 B, fp32 records). */
    long off = 64 + (32 + BLOCK_ROWS * C * 4) + 32 + 1234;
    FILE *f = fopen(data, "r+b");
    CHECK(f != NULL);
    if (!f) return;
    fseek(f, off, SEEK_SET);
    int byte = fgetc(f);
    fseek(f, off, SEEK_SET);
    fputc(byte ^ 0x40, f);
    fclose(f);

    /* Without the fill, get reads around it: the corrupt block's rows are computed now. */
    tl = open_or_die(&r);
    float *got = kd_xmalloc((size_t)N_SAMPLES * C * sizeof(float));
    struct get_all_args ga = {tl, got, -1};
    capture_stderr(path_in_tmp("corrupt-get.log"), get_all_in, &ga);
    CHECK(ga.rc == 0);
    CHECK(same_bits(got, reference, (size_t)N_SAMPLES * C));
    check_log_has(path_in_tmp("corrupt-get.log"), data, "computing its rows now");
    teacher_logits_stats_t s = stats_of(tl);
    CHECK(s.on_demand_samples == BLOCK_ROWS && s.cache_hits == N_BLOCKS - 1);
    CHECK(!teacher_logits_complete(tl));
    teacher_logits_close(&tl);

    /* The fill reports it, recomputes it and writes it back. */
    tl = open_or_die(&r);
    const char *log = path_in_tmp("corrupt.log");
    capture_stderr(log, fill_in, tl);
    s = stats_of(tl);
    CHECK(s.cache_corrupt == 1 && s.cache_hits == N_BLOCKS - 1 && s.cache_misses == 0);
    CHECK(s.forward_samples == BLOCK_ROWS); /* block 1 only */
    CHECK(get_all(tl, 64, got) == 0);
    CHECK(same_bits(got, reference, (size_t)N_SAMPLES * C));
    free(got);
    teacher_logits_close(&tl);
    check_log_has(log, data, "recomputing it");
    char err[KD_ERR_LEN] = "";
    /* Rewritten: the whole entry verifies. */
    char dir[2048];
    snprintf(dir, sizeof dir, "%.*s", (int)(strlen(data) - strlen("/logits.bin")), data);
    kd_cache_t *c = kd_cache_open_entry(dir, err, sizeof err);
    kd_cache_verify_t v = {0};
    CHECK(c && kd_cache_verify(c, &v, NULL, NULL, err, sizeof err) == 0);
    CHECK(v.ok == N_BLOCKS && v.corrupt == 0 && v.missing == 0);
    kd_cache_close(&c);
}

/* ---- two teacher nodes, one cache ----------------------------------------------------------- */

/* A child process: teacher node `index` of 2; writes its stats to out_fd once its fill is
 * done. */
static void child_fill(const kd_recipe_t *r, const kd_dataset_t *ds, int index, int go_fd,
                       int out_fd) {
    char err[KD_ERR_LEN] = "", go;
    teacher_logits_t *tl = teacher_logits_open(r, ds, err, sizeof err);
    if (!tl || read(go_fd, &go, 1) != 1) _exit(2);
    if (teacher_logits_start_fill(tl, index, 2, err, sizeof err) != 0 || !wait_complete(tl))
        _exit(3);
    teacher_logits_stats_t s = stats_of(tl);
    teacher_logits_close(&tl);
    _exit(write(out_fd, &s, sizeof s) == (ssize_t)sizeof s ? 0 : 4);
}

#define N_SHARED 12000 /* 47 blocks */

static void test_two_nodes(void) {
    /* A teacher slow enough that the two fills overlap: 784-512-512-10, random weights. */
    static const kd_layer_spec_t BIG[] = {
        {.kind = KD_LAYER_FLATTEN}, {.kind = KD_LAYER_LINEAR, .out_features = 256},
        {.kind = KD_LAYER_RELU},    {.kind = KD_LAYER_LINEAR, .out_features = 256},
        {.kind = KD_LAYER_RELU},    {.kind = KD_LAYER_LINEAR, .out_features = C},
    };
    char err[KD_ERR_LEN] = "";
    kd_model_t *m = NULL;
    kd_shape_t in = {1, 28, 28};
    if (kd_model_new(BIG, 6, in, &m, err, sizeof err) != 0) die("kd_model_new", err);
    kd_model_init_params(m, 42);
    const char *ckpt = path_in_tmp("big.safetensors");
    CHECK(kd_checkpoint_save(m, ckpt, err, sizeof err) == 0);
    kd_dataset_t *ds = make_dataset(N_SHARED);
    float *want = direct_logits(m, ds);
    kd_model_destroy(&m);
    const size_t n_blocks = (N_SHARED + BLOCK_ROWS - 1) / BLOCK_ROWS;

    kd_recipe_t r;
    base_recipe(&r, path_in_tmp("cache-shared"), ckpt);
    r.teacher.n_layers = 6;
    memcpy(r.teacher.layers, BIG, sizeof BIG);
    int go[2], out[2][2];
    CHECK(pipe(go) == 0 && pipe(out[0]) == 0 && pipe(out[1]) == 0);
    pid_t pid[2];
    fflush(NULL);
    for (int i = 0; i < 2; i++) {
        pid[i] = fork();
        if (pid[i] == 0) child_fill(&r, ds, i, go[0], out[i][1]);
        close(out[i][1]);
    }
    double t0 = kd_now();
    CHECK(write(go[1], "gg", 2) == 2); /* both start filling at once */
    teacher_logits_stats_t s[2] = {{0}};
    uint64_t total = 0;
    for (int i = 0; i < 2; i++) {
        int status = -1;
        CHECK(read(out[i][0], &s[i], sizeof s[i]) == (ssize_t)sizeof s[i]);
        CHECK(waitpid(pid[i], &status, 0) == pid[i] && WIFEXITED(status) &&
              WEXITSTATUS(status) == 0);
        close(out[i][0]);
        total += s[i].forward_samples;
    }
    double both_s = kd_now() - t0;
    close(go[0]);
    close(go[1]);
    /* N, not 2N: a node computes a block only while it holds the cache's claim on it, and reads
     * what the other node finished. (A lane that waits longer than several of its own block
     * times for a claimed block computes it itself, once per lane at most here, in case the
     * other node is stopped. Both compute a share unless one starts a whole fill late; that is
     * scheduling, not checked.) */
    long lanes = sysconf(_SC_NPROCESSORS_ONLN);
    lanes = lanes < 1 ? 1 : lanes > 8 ? 8 : lanes;
    CHECK(total >= N_SHARED && total <= N_SHARED + BLOCK_ROWS * (unsigned long long)lanes);
    fprintf(stderr,
            "  two processes, %d samples: %.3f s; computed %llu + %llu = %llu (%.1f%% extra), "
            "loaded %llu + %llu of %zu blocks from the other\n",
            N_SHARED, both_s, (unsigned long long)s[0].forward_samples,
            (unsigned long long)s[1].forward_samples, (unsigned long long)total,
            100.0 * ((double)total - N_SHARED) / N_SHARED, (unsigned long long)s[0].cache_hits,
            (unsigned long long)s[1].cache_hits, n_blocks);

    /* A third node finds everything cached and verified, and it is the teacher's. */
    teacher_logits_t *tl = open_on(&r, ds);
    t0 = kd_now();
    fill_and_wait(tl);
    fprintf(stderr, "  third node: all %zu blocks from the cache in %.3f s\n", n_blocks,
            kd_now() - t0);
    CHECK(stats_of(tl).forward_samples == 0 && stats_of(tl).cache_hits == n_blocks);
    CHECK(stats_of(tl).cache_corrupt == 0);
    float *got = kd_xmalloc((size_t)N_SHARED * C * sizeof(float));
    CHECK(get_n(tl, N_SHARED, 64, got) == 0);
    CHECK(same_bits(got, want, (size_t)N_SHARED * C));
    free(got);
    teacher_logits_close(&tl);
    free(want);
    kd_dataset_destroy(&ds);
}

/* ---- imported logits ------------------------------------------------------------------------ */

static void test_import(void) {
    const char *dir = path_in_tmp("cache-import");
    char err[KD_ERR_LEN] = "", dfp[KD_CACHE_FP_HEX + 1];
    teacher_logits_data_fingerprint(train, dfp);
    size_t NC = (size_t)N_SAMPLES * C;
    float *logits = kd_xmalloc(NC * sizeof(float));
    for (size_t i = 0; i < NC; i++) logits[i] = (float)((int)(i * 37 % 201) - 100) / 8.0f;
    const char *npy = path_in_tmp("hf.npy"), *short_npy = path_in_tmp("short.npy");
    CHECK(kd_npy_write_f32(npy, logits, N_SAMPLES, C, err, sizeof err) == 0);
    CHECK(kd_npy_write_f32(short_npy, logits, N_SAMPLES - 10, C, err, sizeof err) == 0);
    CHECK(kd_cache_import_npy(dir, npy, dfp, "hf-teacher", KD_ENC_FP32, 0, 0, NULL, 0, err,
                              sizeof err) == 0);
    CHECK(kd_cache_import_npy(dir, short_npy, dfp, "short", KD_ENC_FP32, 0, 0, NULL, 0, err,
                              sizeof err) == 0);

    /* No teacher at all: the imported logits, exactly, and nothing computed. */
    kd_recipe_t r;
    base_recipe(&r, dir, "");
    r.teacher.n_layers = 0;
    r.cache.encoding = KD_ENC_FP16; /* preferred, but the fp32 import is what there is */
    snprintf(r.cache.import, sizeof r.cache.import, "hf-teacher");
    teacher_logits_t *tl = open_or_die(&r);
    CHECK(teacher_logits_complete(tl));
    CHECK(strstr(teacher_logits_entry(tl), "/fp32") != NULL);
    CHECK(teacher_logits_start_fill(tl, 0, 1, err, sizeof err) == 0);
    float *got = kd_xmalloc(NC * sizeof(float));
    CHECK(get_all(tl, 64, got) == 0);
    CHECK(same_bits(got, logits, NC));
    teacher_logits_stats_t s = stats_of(tl);
    CHECK(s.forward_samples == 0 && s.cache_hits == N_BLOCKS);
    teacher_logits_close(&tl);

    /* A label never imported for this split. */
    snprintf(r.cache.import, sizeof r.cache.import, "nope");
    CHECK(teacher_logits_open(&r, train, err, sizeof err) == NULL);
    CHECK_ERR_HAS(err, "cache.import 'nope'");
    CHECK_ERR_HAS(err, dfp);
    CHECK_ERR_HAS(err, "kdist cache import");

    /* An import of other data (fewer rows) under the split's fingerprint. */
    snprintf(r.cache.import, sizeof r.cache.import, "short");
    CHECK(teacher_logits_open(&r, train, err, sizeof err) == NULL);
    CHECK_ERR_HAS(err, "cache.import 'short'");
    CHECK_ERR_HAS(err, "holds 990 samples");
    CHECK_ERR_HAS(err, "has 1000");

    /* An import with a hole: block 2 never written. */
    kd_cache_key_t key = {.n_samples = N_SAMPLES, .n_classes = C, .encoding = KD_ENC_FP32};
    kd_cache_fingerprint_import("holey", key.teacher_fp);
    snprintf(key.data_fp, sizeof key.data_fp, "%s", dfp);
    snprintf(key.teacher_desc, sizeof key.teacher_desc, "import:holey");
    kd_cache_t *c = kd_cache_open(dir, &key, err, sizeof err);
    CHECK(c != NULL);
    for (size_t b = 0; c && b < N_BLOCKS; b++)
        if (b != 2)
            CHECK(kd_cache_put_block(c, b, logits + b * BLOCK_ROWS * C, err, sizeof err) == 0);
    kd_cache_close(&c);
    snprintf(r.cache.import, sizeof r.cache.import, "holey");
    CHECK(teacher_logits_open(&r, train, err, sizeof err) == NULL);
    CHECK_ERR_HAS(err, "cache.import 'holey'");
    CHECK_ERR_HAS(err, "no logits for samples 512..767");
    CHECK_ERR_HAS(err, "block 2 was never written");

    /* Without an import, a recipe needs a teacher. */
    r.cache.import[0] = 0;
    CHECK(teacher_logits_open(&r, train, err, sizeof err) == NULL);
    CHECK_ERR_HAS(err, "teacher.layers is empty");
    r.teacher.n_layers = 4;
    CHECK(teacher_logits_open(&r, train, err, sizeof err) == NULL);
    CHECK_ERR_HAS(err, "teacher.checkpoint is empty");
    snprintf(r.teacher.checkpoint, sizeof r.teacher.checkpoint, "%s", path_in_tmp("none.st"));
    CHECK(teacher_logits_open(&r, train, err, sizeof err) == NULL);
    CHECK_ERR_HAS(err, "none.st");
    free(got);
    free(logits);
}

int main(void) {
    double t0 = kd_now();
    kd_log_threshold = KD_LOG_WARN;
    /* The fill runs one lane per core with OpenBLAS single-threaded (teacher_logits_open sets
     * it); the reference must be computed the same way to compare bits. */
    kd_set_threads(1);
    tmp = kd_test_tmpdir("test_teacher_logits");
    train = make_dataset(N_SAMPLES);
    kd_model_t *m = load_mlp(FIXTURE_MLP);
    reference = direct_logits(m, train);
    kd_model_destroy(&m);

    test_reference_is_the_teacher();
    test_fill_then_reuse();
    test_on_demand();
    test_lossy(KD_ENC_FP16, 0);
    test_lossy(KD_ENC_INT8, 0);
    test_lossy(KD_ENC_TOPK, 3);
    test_roundtrip_refusals();
    test_corrupt_block();
    test_two_nodes();
    test_import();

    free(reference);
    kd_dataset_destroy(&train);
    if (kd_test_failures == 0) { /* keep the files of a failed run for a look */
        char cmd[1200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        CHECK(system(cmd) == 0);
    }
    fprintf(stderr, "test_teacher_logits: %.2f s\n", kd_now() - t0);
    return kd_test_done("test_teacher_logits");
}
