/* Tests for kd_loss_sparse_row and the cache's record views (kd_cache_record_view): the
 * per-token losses of language-model distillation against top-k and sampled teachers. The
 * references are independent: the dense kd_loss (top-k with k = C has no rest bucket, so it must
 * be the dense loss), central finite differences, the bucket formula written out for forward
 * KL, the mean of many sampled gradients (unbiased: it must approach the dense gradient), and a
 * PyTorch computation of the same losses on the same ids (tests/data/make_sparse_loss_fixtures.py:
 * autograd over the buckets, written from the definitions). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kd_cache.h"
#include "kd_loss.h"
#include "kd_safetensors.h"
#include "kd_util.h"
#include "kd_test.h"

static const kd_divergence_t DIVS[] = {KD_DIV_FORWARD_KL, KD_DIV_REVERSE_KL, KD_DIV_SYMMETRIC_KL,
                                       KD_DIV_JS};

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static double uniform(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}
static void fill(float *x, int n, double scale) {
    for (int i = 0; i < n; i++) x[i] = (float)(scale * (2.0 * uniform() - 1.0));
}

static kd_cache_key_t key_for(kd_cache_encoding_t enc, int C, int k, float T) {
    kd_cache_key_t key = {
        .n_samples = 1 << 20, .n_classes = C, .encoding = enc, .k = k, .sample_temperature = T};
    snprintf(key.teacher_fp, sizeof key.teacher_fp, "%0*d", KD_CACHE_FP_HEX, 0);
    snprintf(key.data_fp, sizeof key.data_fp, "%0*d", KD_CACHE_FP_HEX, 0);
    return key;
}

/* A record of teacher logits t (C) in enc, and its view into ids / vals. */
typedef struct {
    uint8_t rec[8192];
    uint32_t ids[1100];
    float vals[1100];
    kd_teacher_row_t view;
} encoded_t;

static void encode(const kd_cache_key_t *key, const float *t, size_t row, encoded_t *e) {
    char err[256];
    CHECK(kd_cache_record_bytes(key->encoding, key->n_classes, key->k) <= sizeof e->rec);
    CHECK(kd_cache_encode_records(key, row, 1, t, e->rec, NULL, err, sizeof err) == 0);
    CHECK(kd_cache_record_view(key, e->rec, e->ids, e->vals, &e->view) == 0);
}

static double loss_of(const kd_loss_config_t *c, const kd_teacher_row_t *t, const float *z, int C,
                      int32_t y) {
    float *tmp = kd_alloc_floats((size_t)C);
    memcpy(tmp, z, (size_t)C * sizeof *tmp);
    kd_loss_stats_t st = {0};
    kd_loss_sparse_row(c, t, tmp, C, y, 1.0f, false, &st);
    free(tmp);
    return st.loss_sum;
}

/* Every gradient entry against a central difference of the loss. */
static int fd_mismatches(const kd_loss_config_t *c, const kd_teacher_row_t *t, float *z, int C,
                         int32_t y) {
    float *g = kd_alloc_floats((size_t)C);
    memcpy(g, z, (size_t)C * sizeof *g);
    kd_loss_sparse_row(c, t, g, C, y, 1.0f, true, NULL);
    int bad = 0;
    double sum = 0.0;
    for (int j = 0; j < C; j++) {
        float z0 = z[j];
        const float h = 1e-2f;
        z[j] = z0 + h;
        double lp = loss_of(c, t, z, C, y);
        z[j] = z0 - h;
        double lm = loss_of(c, t, z, C, y);
        z[j] = z0;
        double fd = (lp - lm) / (2.0 * h);
        if (!(fabs(fd - g[j]) <= 2e-5 + 3e-3 * fabs(fd)) && bad++ < 3)
            fprintf(stderr, "  fd div=%d T=%g a=%g j=%d: %.8g vs %.8g\n", (int)c->divergence,
                    (double)c->temperature, (double)c->alpha, j, (double)g[j], fd);
        sum += g[j];
    }
    if (fabs(sum) > 1e-5) bad++; /* softmax shift invariance */
    free(g);
    return bad;
}

/* top-k with k = C keeps everything: no rest bucket, so it is the dense loss exactly. */
static void test_topk_full_is_dense(void) {
    const int C = 40;
    float z[40], t[40], g_dense[40], g_sparse[40];
    for (size_t d = 0; d < sizeof DIVS / sizeof DIVS[0]; d++)
        for (int ti = 0; ti < 2; ti++) {
            kd_loss_config_t c = {DIVS[d], ti ? 2.5f : 1.0f, 0.6f};
            fill(z, C, 3.0);
            fill(t, C, 4.0);
            int32_t y = 7;
            kd_cache_key_t key = key_for(KD_ENC_TOPK, C, C, 0);
            encoded_t e;
            encode(&key, t, 0, &e);
            CHECK(e.view.n == C && e.view.ids && e.view.rest_lse == -INFINITY);
            /* the record's logits (fp16 differences to the largest) as a dense row */
            for (int b = 0; b < e.view.n; b++) t[e.view.ids[b]] = e.view.values[b];
            kd_loss_stats_t sd = {0}, ss = {0};
            kd_loss(&c, z, t, &y, 1, C, g_dense, &sd);
            memcpy(g_sparse, z, sizeof z);
            kd_loss_sparse_row(&c, &e.view, g_sparse, C, y, 1.0f, true, &ss);
            CHECK_CLOSE(ss.loss_sum, sd.loss_sum, 1e-9);
            CHECK_CLOSE(ss.kd_sum, sd.kd_sum, 1e-9);
            CHECK(ss.agree == sd.agree && ss.correct == sd.correct && ss.count == 1);
            double worst = 0.0;
            for (int j = 0; j < C; j++) worst = fmax(worst, fabs(g_sparse[j] - g_dense[j]));
            CHECK(worst < 1e-7);
        }
}

/* Forward KL over the buckets written out: sum_b P_b log(P_b / Q_b), the rest's teacher mass
 * from rest_lse shared equally by its C - k classes. */
static double bucket_forward_kl(const float *z, const kd_teacher_row_t *t, int C, double T) {
    double mx = -INFINITY;
    for (int j = 0; j < C; j++) mx = fmax(mx, z[j] / T);
    double zs = 0.0;
    for (int j = 0; j < C; j++) zs += exp(z[j] / T - mx);
    double lr = log((double)(C - t->n)), tr = lr + (t->rest_lse - lr) / T;
    double tmx = tr, ts = 0.0;
    for (int b = 0; b < t->n; b++) tmx = fmax(tmx, t->values[b] / T);
    for (int b = 0; b < t->n; b++) ts += exp(t->values[b] / T - tmx);
    ts += exp(tr - tmx);
    double kl = 0.0, qk = 0.0;
    for (int b = 0; b < t->n; b++) {
        double p = exp(t->values[b] / T - tmx) / ts, q = exp(z[t->ids[b]] / T - mx) / zs;
        kl += p * log(p / q);
        qk += q;
    }
    double pr = exp(tr - tmx) / ts;
    return kl + pr * log(pr / (1.0 - qk));
}

static void test_topk_gradients(void) {
    const int C = 64;
    float z[64], t[64];
    int checked = 0;
    for (size_t d = 0; d < sizeof DIVS / sizeof DIVS[0]; d++)
        for (int ti = 0; ti < 2; ti++)
            for (int k = 1; k <= 16; k *= 4) {
                kd_loss_config_t c = {DIVS[d], ti ? 2.0f : 1.0f, ti ? 0.7f : 1.0f};
                fill(z, C, 2.0);
                fill(t, C, 5.0);
                kd_cache_key_t key = key_for(KD_ENC_TOPK, C, k, 0);
                encoded_t e;
                encode(&key, t, 0, &e);
                CHECK(e.view.n == k && isfinite(e.view.rest_lse));
                CHECK(fd_mismatches(&c, &e.view, z, C, 3) == 0);
                if (DIVS[d] == KD_DIV_FORWARD_KL) {
                    kd_loss_stats_t st = {0};
                    float tmp[64];
                    memcpy(tmp, z, sizeof z);
                    kd_loss_sparse_row(&c, &e.view, tmp, C, 3, 1.0f, false, &st);
                    CHECK_CLOSE(st.kd_sum,
                                c.temperature * c.temperature *
                                    bucket_forward_kl(z, &e.view, C, c.temperature),
                                1e-9);
                }
                checked++;
            }
    CHECK(checked == 24);
}

/* The sampled gradient is unbiased: averaged over many rows' draws it approaches the dense
 * forward-KL gradient q - p (both at T); one row's draws alone are far from it. */
static void test_sampled_unbiased(void) {
    const int C = 30, draws = 12, rows = 20000;
    const float T = 1.5f;
    float z[30], t[30], g[30], g_dense[30];
    fill(z, C, 2.0);
    fill(t, C, 4.0);
    kd_loss_config_t c = {KD_DIV_FORWARD_KL, T, 1.0f};
    int32_t y = 0;
    kd_loss(&c, z, t, &y, 1, C, g_dense, NULL);
    kd_cache_key_t key = key_for(KD_ENC_SAMPLED, C, draws, T);
    CHECK(kd_cache_record_bytes(KD_ENC_SAMPLED, C, draws) == 24);
    double mean[30] = {0}, first_err = 0.0;
    for (int r = 0; r < rows; r++) {
        encoded_t e;
        encode(&key, t, (size_t)r, &e);
        int total = 0;
        for (int b = 0; b < e.view.n; b++) total += (int)e.view.values[b];
        CHECK(e.view.sampled && total == draws);
        memcpy(g, z, sizeof z);
        kd_loss_sparse_row(&c, &e.view, g, C, y, 1.0f, true, NULL);
        for (int j = 0; j < C; j++) mean[j] += g[j] / rows;
        if (r == 0)
            for (int j = 0; j < C; j++) first_err = fmax(first_err, fabs(g[j] - g_dense[j]));
        if (r == 0) CHECK(fd_mismatches(&c, &e.view, z, C, y) == 0);
    }
    double worst = 0.0;
    for (int j = 0; j < C; j++) worst = fmax(worst, fabs(mean[j] - g_dense[j]));
    CHECK(worst < 0.01);
    CHECK(first_err > 0.02); /* one row's draws alone are a noisy estimate */
    /* the same row draws the same classes (every writer of a block writes the same bytes) */
    encoded_t a, b;
    encode(&key, t, 77, &a);
    encode(&key, t, 77, &b);
    CHECK(memcmp(a.rec, b.rec, 24) == 0);
}

/* A record the encoder cannot have written is refused, never served. */
static void test_bad_records(void) {
    const int C = 300;
    float t[300];
    fill(t, C, 3.0);
    kd_cache_key_t sk = key_for(KD_ENC_SAMPLED, C, 4, 1.0f);
    encoded_t e;
    encode(&sk, t, 5, &e);
    uint8_t bad[8];
    memcpy(bad, e.rec, 8);
    bad[0] = 0xff, bad[1] = 0xff; /* id 65535 >= C */
    CHECK(kd_cache_record_view(&sk, bad, e.ids, e.vals, &e.view) != 0);
    memcpy(bad, e.rec, 8);
    bad[6] = 0, bad[7] = 0; /* the last id 0: not sorted (unless all are 0) */
    if (e.rec[0] || e.rec[1]) CHECK(kd_cache_record_view(&sk, bad, e.ids, e.vals, &e.view) != 0);
    kd_cache_key_t tk = key_for(KD_ENC_TOPK, C, 3, 0);
    encode(&tk, t, 0, &e);
    uint8_t rec[64];
    memcpy(rec, e.rec, kd_cache_record_bytes(KD_ENC_TOPK, C, 3));
    float nan = NAN;
    memcpy(rec + 4, &nan, 4);
    CHECK(kd_cache_record_view(&tk, rec, e.ids, e.vals, &e.view) != 0);
    /* f32 rest, f32 largest, f16 differences to it [2], u16 ids [3] */
    memcpy(rec, e.rec, sizeof rec);
    uint16_t big = 300;
    memcpy(rec + 12, &big, 2); /* an id >= C */
    CHECK(kd_cache_record_view(&tk, rec, e.ids, e.vals, &e.view) != 0);
    memcpy(rec, e.rec, sizeof rec);
    uint16_t above = 0x3c00; /* +1.0: a kept logit above the largest */
    memcpy(rec + 8, &above, 2);
    CHECK(kd_cache_record_view(&tk, rec, e.ids, e.vals, &e.view) != 0);
    memcpy(rec, e.rec, sizeof rec);
    CHECK(kd_cache_record_view(&tk, rec, e.ids, e.vals, &e.view) == 0);
    float t_nan[300];
    memcpy(t_nan, t, sizeof t);
    t_nan[9] = INFINITY;
    char err[256];
    CHECK(kd_cache_encode_records(&tk, 0, 1, t_nan, rec, NULL, err, sizeof err) != 0);
    CHECK_ERR_HAS(err, "class 9");
}

/* Positions whose target is < 0 count for nothing. */
static void test_masked_position(void) {
    float z[8] = {1, 2, 3, 4, 5, 6, 7, 8}, t[8] = {8, 7, 6, 5, 4, 3, 2, 1};
    kd_cache_key_t key = key_for(KD_ENC_TOPK, 8, 2, 0);
    encoded_t e;
    encode(&key, t, 0, &e);
    kd_loss_config_t c = {KD_DIV_FORWARD_KL, 1.0f, 0.5f};
    kd_loss_stats_t st = {0};
    CHECK(kd_loss_sparse_row(&c, &e.view, z, 8, -1, 1.0f, true, &st) == 0.0);
    CHECK(st.count == 0);
    for (int j = 0; j < 8; j++) CHECK(z[j] == 0.0f);
}

/* ---- against PyTorch ----------------------------------------------------------------------- */

#define TORCH_FILE "data/sparse_loss_io.safetensors"

static kd_safetensors_t *torch_io;

/* A tensor of the fixture copied out (its data need not be aligned); exits when misshaped. */
static void *torch_tensor(const char *name, kd_dtype_t dtype, size_t count) {
    const kd_st_tensor_t *t = kd_st_find(torch_io, name);
    if (!t || t->dtype != dtype || t->nbytes != count * 4) {
        fprintf(stderr, "%s: tensor %s missing or misshaped\n", TORCH_FILE, name);
        exit(1);
    }
    void *c = kd_xmalloc(t->nbytes);
    memcpy(c, kd_st_data(torch_io, t), t->nbytes);
    return c;
}

/* Every row of one case: kdist's loss and gradient against PyTorch's. */
static void check_torch_case(const char *name, const kd_loss_config_t *cfg,
                             const kd_teacher_row_t *rows, const float *z, const int32_t *y, int R,
                             int V) {
    char what[128];
    snprintf(what, sizeof what, "%s.loss", name);
    float *want_loss = torch_tensor(what, KD_DTYPE_F32, (size_t)R);
    snprintf(what, sizeof what, "%s.grad", name);
    float *want_grad = torch_tensor(what, KD_DTYPE_F32, (size_t)R * V);
    double worst = 0.0;
    float *g = kd_alloc_floats((size_t)V);
    for (int r = 0; r < R; r++) {
        memcpy(g, z + (size_t)r * V, (size_t)V * sizeof *g);
        double loss = kd_loss_sparse_row(cfg, &rows[r], g, V, y[r], 1.0f, true, NULL);
        worst = fmax(worst, fabs(loss - want_loss[r]) / fmax(1.0, fabs(want_loss[r])));
        for (int j = 0; j < V; j++)
            worst = fmax(worst, fabs((double)g[j] - want_grad[(size_t)r * V + j]));
    }
    if (worst > 1e-6) fprintf(stderr, "%s: kdist and PyTorch differ by %.3g\n", name, worst);
    CHECK(worst <= 1e-6); /* float32 rounding: they agree to ~5e-8 */
    free(g);
    free(want_loss);
    free(want_grad);
}

static void test_against_pytorch(void) {
    char err[KD_ERR_LEN];
    if (kd_st_open(TORCH_FILE, &torch_io, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        CHECK(false);
        return;
    }
    enum { R = 6, V = 50, K = 8, N = 12 };
    float *z = torch_tensor("z", KD_DTYPE_F32, R * V);
    int32_t *y = torch_tensor("y", KD_DTYPE_I32, R);
    int32_t *top_ids = torch_tensor("topk_ids", KD_DTYPE_I32, R * K);
    float *top_vals = torch_tensor("topk_vals", KD_DTYPE_F32, R * K);
    float *top_rest = torch_tensor("topk_rest", KD_DTYPE_F32, R);
    int32_t *draws = torch_tensor("sampled_ids", KD_DTYPE_I32, R * N);

    /* top-k rows as given */
    uint32_t ids[R][K];
    kd_teacher_row_t rows[R];
    for (int r = 0; r < R; r++) {
        for (int b = 0; b < K; b++) ids[r][b] = (uint32_t)top_ids[r * K + b];
        rows[r] = (kd_teacher_row_t){
            .n = K, .ids = ids[r], .values = top_vals + r * K, .rest_lse = top_rest[r]};
    }
    static const char *const div_names[] = {"forward_kl", "reverse_kl", "symmetric_kl", "js"};
    static const float temps[] = {1.0f, 2.5f}, alphas[] = {0.5f, 1.0f};
    for (int d = 0; d < 4; d++)
        for (int ti = 0; ti < 2; ti++)
            for (int ai = 0; ai < 2; ai++) {
                char name[96];
                snprintf(name, sizeof name, "topk.%s.t%g.a%g", div_names[d], (double)temps[ti],
                         (double)alphas[ai]);
                kd_loss_config_t cfg = {DIVS[d], temps[ti], alphas[ai]};
                check_torch_case(name, &cfg, rows, z, y, R, V);
            }

    /* sampled rows through the cache's own record layout: u16 draws, ascending */
    kd_cache_key_t key = key_for(KD_ENC_SAMPLED, V, N, 2.0f);
    encoded_t enc[R];
    for (int r = 0; r < R; r++) {
        for (int i = 0; i < N; i++) {
            uint16_t id = (uint16_t)draws[r * N + i];
            memcpy(enc[r].rec + 2 * i, &id, 2);
        }
        CHECK(kd_cache_record_view(&key, enc[r].rec, enc[r].ids, enc[r].vals, &enc[r].view) == 0);
        rows[r] = enc[r].view;
    }
    for (int ai = 0; ai < 2; ai++) {
        char name[96];
        snprintf(name, sizeof name, "sampled.forward_kl.t2.a%g", (double)alphas[ai]);
        kd_loss_config_t cfg = {KD_DIV_FORWARD_KL, 2.0f, alphas[ai]};
        check_torch_case(name, &cfg, rows, z, y, R, V);
    }
    free(z);
    free(y);
    free(top_ids);
    free(top_vals);
    free(top_rest);
    free(draws);
    kd_st_close(&torch_io);
}

int main(void) {
    test_topk_full_is_dense();
    test_topk_gradients();
    test_sampled_unbiased();
    test_bad_records();
    test_masked_position();
    test_against_pytorch();
    return kd_test_done("test_loss_sparse");
}
