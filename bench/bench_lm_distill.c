/* kd_bench_lm_distill: what the cache encodings of token-level distillation cost and what they
 * lose, on a recipe's trained teacher and student and a fixed batch of its training windows:
 *   - bias: for each encoding, the mean KL of the distribution its record implies (top-k: the
 *     kept classes and the rest shared equally; sampled: the draws' counts) to the teacher's
 *     dense one, KL(implied || dense), and the error of the distillation gradient (forward KL,
 *     T = 1, alpha = 1, with respect to the student's logits) against the dense gradient,
 *     |g - g_dense| / |g_dense| over the batch; for sampled, one draw and the mean of --draws;
 *   - the teacher node: tokens/s of its forward passes with the head encoding every position,
 *     against the same passes' GEMMs replayed with cblas_sgemm (the sgemm bound; target
 *     >= 50%), one thread as each fill lane runs;
 *   - the worker: tokens/s of a distillation step reading each encoding's records against a
 *     step on hard labels alone (target >= 90%).
 *   usage: kd_bench_lm_distill --recipe RECIPE --student WEIGHTS [--windows N] [--draws N]
 *                              [--seconds S]
 * The teacher is the recipe's teacher.checkpoint. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_bench.h"
#include "kd_cache.h"
#include "kd_checkpoint.h"
#include "kd_loss.h"
#include "kd_tokens.h"
#include "kd_train.h"
#include "kd_util.h"

#define MAX_TRACE 65536

typedef struct {
    const char *name;
    kd_cache_encoding_t enc;
    int k;
} encoding_t;

static const encoding_t ENCODINGS[] = {{"fp16", KD_ENC_FP16, 0},
                                       {"int8", KD_ENC_INT8, 0},
                                       {"topk8", KD_ENC_TOPK, 8},
                                       {"topk32", KD_ENC_TOPK, 32},
                                       {"sampled12", KD_ENC_SAMPLED, 12}};
#define N_ENC (int)(sizeof ENCODINGS / sizeof ENCODINGS[0])

static kd_cache_key_t key_of(const encoding_t *e, int V) {
    kd_cache_key_t key = {.n_samples = (size_t)1 << 30,
                          .n_classes = V,
                          .encoding = e->enc,
                          .k = e->k,
                          .sample_temperature = 1.0f,
                          .block_rows = 1};
    snprintf(key.teacher_fp, sizeof key.teacher_fp, "%0*d", KD_CACHE_FP_HEX, 0);
    snprintf(key.data_fp, sizeof key.data_fp, "%0*d", KD_CACHE_FP_HEX, 0);
    return key;
}

/* KL(implied || dense) of one position: implied from the record's view, dense the teacher's
 * softmax (logp, V). */
static double implied_kl(const kd_teacher_row_t *v, const double *logp, int V, double *implied) {
    if (!v->ids) { /* a dense row: its own softmax */
        double mx = -INFINITY, z = 0.0;
        for (int j = 0; j < V; j++) mx = fmax(mx, v->values[j]);
        for (int j = 0; j < V; j++) z += exp(v->values[j] - mx);
        for (int j = 0; j < V; j++) implied[j] = exp(v->values[j] - mx) / z;
    } else if (v->sampled) {
        double n = 0.0;
        for (int b = 0; b < v->n; b++) n += v->values[b];
        for (int j = 0; j < V; j++) implied[j] = 0.0;
        for (int b = 0; b < v->n; b++) implied[v->ids[b]] = v->values[b] / n;
    } else {
        double mx = v->rest_lse, z = 0.0;
        for (int b = 0; b < v->n; b++) mx = fmax(mx, v->values[b]);
        for (int b = 0; b < v->n; b++) z += exp(v->values[b] - mx);
        const double rest = v->n < V ? exp(v->rest_lse - mx) : 0.0;
        z += rest;
        for (int j = 0; j < V; j++) implied[j] = v->n < V ? rest / z / (V - v->n) : 0.0;
        for (int b = 0; b < v->n; b++) implied[v->ids[b]] = exp(v->values[b] - mx) / z;
    }
    double kl = 0.0;
    for (int j = 0; j < V; j++)
        if (implied[j] > 0) kl += implied[j] * (log(implied[j]) - logp[j]);
    return kl;
}

typedef struct {
    kd_model_t *m;
    const uint32_t *tokens;
    int B, T;
    const kd_cache_key_t *key; /* NULL: the head alone */
    uint8_t *records;
    void *codec;
} teacher_work_t;

static double encode_head(void *ctx, size_t pos0, size_t n, float *logits, bool grad) {
    (void)grad;
    teacher_work_t *w = ctx;
    if (!w->key) return 0.0;
    const size_t rb = kd_cache_record_bytes(w->key->encoding, w->key->n_classes, w->key->k);
    char err[KD_ERR_LEN];
    KD_ASSERT(kd_cache_encode_records(w->key, pos0, n, logits, w->records + pos0 * rb, &w->codec,
                                      err, sizeof err) == 0);
    return 0.0;
}

static void teacher_pass(void *arg) {
    teacher_work_t *w = arg;
    kd_gpt_forward(w->m->gpt, w->tokens, w->B, w->T, false, 0);
    kd_gpt_head(w->m->gpt, encode_head, w, false);
}

typedef struct {
    kd_model_t *m;
    const uint32_t *windows;
    int B;
    const kd_loss_config_t *loss;
    const kd_lm_teacher_t *teacher; /* NULL: hard labels */
    kd_lm_batch_t scratch;
} step_work_t;

static void student_step(void *arg) {
    step_work_t *w = arg;
    kd_train_gradient_lm(w->m, w->windows, w->B, 1, w->loss, w->teacher, &w->scratch, NULL);
}

static int load(const kd_recipe_t *r, bool teacher, const kd_dataset_t *d, const char *path,
                kd_model_t **m) {
    char err[KD_ERR_LEN];
    if (kd_model_from_recipe(r, teacher, d, m, err, sizeof err) != 0 ||
        kd_checkpoint_load(*m, path, err, sizeof err) != 0) {
        fprintf(stderr, "kd_bench_lm_distill: %s: %s\n", path, err);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *recipe = NULL, *student_path = NULL;
    int W = 16, draws = 200;
    double seconds = 2.0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--recipe") == 0) recipe = argv[i + 1];
        if (strcmp(argv[i], "--student") == 0) student_path = argv[i + 1];
        if (strcmp(argv[i], "--windows") == 0) W = atoi(argv[i + 1]);
        if (strcmp(argv[i], "--draws") == 0) draws = atoi(argv[i + 1]);
        if (strcmp(argv[i], "--seconds") == 0) seconds = atof(argv[i + 1]);
    }
    if (!recipe || !student_path || W < 1 || draws < 1) {
        fprintf(stderr, "usage: kd_bench_lm_distill --recipe RECIPE --student WEIGHTS "
                        "[--windows N] [--draws N] [--seconds S]\n");
        return 2;
    }
    char err[KD_ERR_LEN];
    kd_recipe_t r;
    kd_splits_t d = {0};
    if (kd_recipe_load(recipe, NULL, 0, &r, err, sizeof err) != 0 ||
        kd_splits_load(&r, &d, err, sizeof err) != 0) {
        fprintf(stderr, "kd_bench_lm_distill: %s\n", err);
        return 1;
    }
    kd_set_threads(1); /* as each teacher fill lane runs; the worker's step too, for a fair ratio */
    kd_model_t *teacher = NULL, *student = NULL;
    if (load(&r, true, d.train, r.teacher.checkpoint, &teacher) != 0 ||
        load(&r, false, d.train, student_path, &student) != 0)
        return 1;
    const int T = (int)d.train->window - 1, V = d.train->num_classes;
    if ((size_t)W > d.train->n) W = (int)d.train->n;
    uint32_t *windows = kd_xmalloc((size_t)W * (T + 1) * sizeof *windows), *ids = kd_xmalloc(W * 4);
    for (int i = 0; i < W; i++) ids[i] = (uint32_t)((size_t)i * (d.train->n / (size_t)W));
    kd_dataset_gather_windows(d.train, ids, (size_t)W, windows);
    kd_lm_batch_t lb = {0};
    kd_lm_batch_split(&lb, windows, W, T);
    const size_t P = (size_t)W * T;
    float *t_logits = kd_alloc_floats(P * V), *s_logits = kd_alloc_floats(P * V);
    kd_gpt_forward(teacher->gpt, lb.tokens, W, T, false, 0);
    kd_gpt_logits(teacher->gpt, t_logits);
    kd_gpt_forward(student->gpt, lb.tokens, W, T, false, 0);
    kd_gpt_logits(student->gpt, s_logits);

    /* ---- bias ---- */
    const kd_loss_config_t kl = {KD_DIV_FORWARD_KL, 1.0f, 1.0f};
    double *logp = kd_xmalloc((size_t)V * sizeof *logp), *implied = kd_xmalloc(V * sizeof(double));
    float *g_ref = kd_alloc_floats(P * V), *g = kd_alloc_floats(P * V);
    float *g_mean = kd_alloc_floats(P * V);
    uint32_t *vid = kd_xmalloc((size_t)(V + 1) * sizeof *vid);
    float *vval = kd_alloc_floats((size_t)V + 1);
    uint8_t *rec = kd_xmalloc(kd_cache_record_bytes(KD_ENC_FP32, V, 0));
    const float scale = 1.0f / (float)P;
    for (size_t p = 0; p < P; p++) { /* the dense reference */
        kd_teacher_row_t dense = {V, NULL, t_logits + p * V, -INFINITY, false};
        memcpy(g_ref + p * V, s_logits + p * V, V * sizeof(float));
        kd_loss_sparse_row(&kl, &dense, g_ref + p * V, V, lb.targets[p], scale, true, NULL);
    }
    double ref_norm = 0.0;
    for (size_t i = 0; i < P * V; i++) ref_norm += (double)g_ref[i] * g_ref[i];
    ref_norm = sqrt(ref_norm);
    printf("bias on %d windows x %d positions (vocabulary %d): forward KL, T 1, alpha 1\n", W, T,
           V);
    printf("%-10s %12s %22s %18s\n", "encoding", "bytes/token", "KL(implied || dense)",
           "gradient error");
    for (int e = 0; e < N_ENC; e++) {
        const kd_cache_key_t key = key_of(&ENCODINGS[e], V);
        const int rounds = key.encoding == KD_ENC_SAMPLED ? draws : 1;
        double kl_sum = 0.0, first_err = 0.0;
        memset(g_mean, 0, P * V * sizeof(float));
        for (int round = 0; round < rounds; round++) {
            for (size_t p = 0; p < P; p++) {
                const float *t = t_logits + p * V;
                double mx = -INFINITY, z = 0.0;
                for (int j = 0; j < V; j++) mx = fmax(mx, t[j]);
                for (int j = 0; j < V; j++) z += exp(t[j] - mx);
                for (int j = 0; j < V; j++) logp[j] = t[j] - mx - log(z);
                /* another draw each round: rows keyed past the batch's */
                KD_ASSERT(kd_cache_encode_records(&key, p + (size_t)round * P, 1, t, rec, NULL, err,
                                                  sizeof err) == 0);
                kd_teacher_row_t v;
                KD_ASSERT(kd_cache_record_view(&key, rec, vid, vval, &v) == 0);
                if (round == 0) kl_sum += implied_kl(&v, logp, V, implied);
                memcpy(g + p * V, s_logits + p * V, V * sizeof(float));
                kd_loss_sparse_row(&kl, &v, g + p * V, V, lb.targets[p], scale, true, NULL);
            }
            double diff = 0.0;
            for (size_t i = 0; i < P * V; i++) {
                diff += ((double)g[i] - g_ref[i]) * ((double)g[i] - g_ref[i]);
                g_mean[i] += g[i] / (float)rounds;
            }
            if (round == 0) first_err = sqrt(diff) / ref_norm;
        }
        double mean_diff = 0.0;
        for (size_t i = 0; i < P * V; i++)
            mean_diff += ((double)g_mean[i] - g_ref[i]) * ((double)g_mean[i] - g_ref[i]);
        printf("%-10s %12zu %22.5f %11.4f", ENCODINGS[e].name,
               kd_cache_record_bytes(key.encoding, V, key.k), kl_sum / (double)P, first_err);
        if (rounds > 1) printf("   (mean of %d draws: %.4f)", rounds, sqrt(mean_diff) / ref_norm);
        printf("\n");
    }

    /* ---- the teacher node: forward + encoding against the sgemm bound ---- */
    printf("\nteacher node: forward passes of %ld windows, one thread (a fill lane)\n",
           r.teacher.batch_size);
    const int S = (int)(r.teacher.batch_size < W ? r.teacher.batch_size : W);
    kd_sgemm_call_t *trace = kd_xmalloc(MAX_TRACE * sizeof *trace);
    teacher_work_t tw = {teacher, lb.tokens, S, T, NULL, NULL, NULL};
    int n_calls = kd_bench_trace(teacher_pass, &tw, trace, MAX_TRACE);
    kd_gemm_replay_t replay;
    kd_gemm_replay_init(&replay, trace, n_calls < MAX_TRACE ? n_calls : MAX_TRACE);
    const kd_bench_timing_t bound = kd_bench_time(kd_gemm_replay, &replay, 1, seconds);
    const double tokens = (double)S * T;
    printf("%-22s %12s %14s\n", "", "tokens/s", "of sgemm bound");
    printf("%-22s %12.0f %13.0f%%\n", "sgemm replay", tokens / bound.wall, 100.0);
    uint8_t *records = kd_xmalloc((size_t)S * T * kd_cache_record_bytes(KD_ENC_FP32, V, 0));
    for (int e = -1; e < N_ENC; e++) {
        kd_cache_key_t key = e >= 0 ? key_of(&ENCODINGS[e], V) : (kd_cache_key_t){0};
        tw.key = e >= 0 ? &key : NULL;
        tw.records = records;
        kd_bench_timing_t t = kd_bench_time(teacher_pass, &tw, 1, seconds);
        printf("%-22s %12.0f %13.0f%%\n", e >= 0 ? ENCODINGS[e].name : "logits, no encoding",
               tokens / t.wall, 100.0 * bound.wall / t.wall);
        kd_cache_codec_free(&tw.codec);
    }

    /* ---- the worker: a distillation step against hard labels ---- */
    const int B = (int)(r.train.batch_size < W ? r.train.batch_size : W);
    printf("\nworker: one step (forward, loss, backward) on %d windows, one thread\n", B);
    step_work_t sw = {student, windows, B, &r.distill.loss, NULL, {0}};
    kd_bench_timing_t hard = kd_bench_time(student_step, &sw, 1, seconds);
    printf("%-22s %12s %14s\n", "", "tokens/s", "of hard labels");
    printf("%-22s %12.0f %13.0f%%\n", "hard labels", (double)B * T / hard.wall, 100.0);
    for (int e = 0; e < N_ENC; e++) {
        kd_cache_key_t key = key_of(&ENCODINGS[e], V);
        kd_lm_teacher_t lt;
        kd_recipe_t rr = r;
        rr.cache.encoding = key.encoding;
        rr.cache.topk = key.k;
        rr.cache.samples = key.k;
        rr.distill.loss.temperature = 1.0f; /* sampled records are drawn at T 1 here */
        kd_lm_teacher_format(&rr, V, &lt);
        uint8_t *recs = kd_xmalloc((size_t)B * T * lt.record_bytes);
        KD_ASSERT(kd_cache_encode_records(&key, 0, (size_t)B * T, t_logits, recs, NULL, err,
                                          sizeof err) == 0);
        lt.records = recs;
        kd_loss_config_t loss = r.distill.loss;
        loss.temperature = 1.0f;
        step_work_t dw = {student, windows, B, &loss, &lt, {0}};
        kd_bench_timing_t t = kd_bench_time(student_step, &dw, 1, seconds);
        printf("%-22s %12.0f %13.0f%%\n", ENCODINGS[e].name, (double)B * T / t.wall,
               100.0 * hard.wall / t.wall);
        kd_lm_batch_free(&dw.scratch);
        free(recs);
    }
    kd_lm_batch_free(&sw.scratch);
    kd_gemm_replay_free(&replay);
    free(trace);
    free(records);
    free(rec);
    free(vid);
    free(vval);
    free(g_ref);
    free(g);
    free(g_mean);
    free(logp);
    free(implied);
    free(t_logits);
    free(s_logits);
    free(windows);
    free(ids);
    kd_lm_batch_free(&lb);
    kd_model_destroy(&teacher);
    kd_model_destroy(&student);
    kd_splits_destroy(&d);
    return 0;
}
