/* kd_train: the in-process training loop (see kd_train.h). */
#include "kd_train.h"

#include "kd_cache.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_cache.h"
#include "kd_log.h"
#include "kd_rng.h"
#include "kd_tokens.h"

int kd_splits_load(const kd_recipe_t *r, kd_splits_t *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (kd_recipe_is_lm(r))
        return kd_tokens_load_splits(r, &out->train, &out->val, &out->test, err, errlen);
    char images[KD_PATH_MAX], labels[KD_PATH_MAX];
    kd_dataset_t *full = NULL, *test = NULL;

    kd_recipe_data_path(r, r->data.train_images, images, sizeof images);
    kd_recipe_data_path(r, r->data.train_labels, labels, sizeof labels);
    if (kd_idx_load(images, labels, &full, err, errlen) != 0) goto fail;
    if (r->data.train_subset > 0 && (size_t)r->data.train_subset < full->n)
        full->n = (size_t)r->data.train_subset; /* a prefix: the buffers stay valid */
    if (kd_dataset_split(full, (size_t)r->data.val_size, (uint64_t)r->seed, &out->train, &out->val,
                         err, errlen) != 0)
        goto fail;
    kd_dataset_destroy(&full);

    kd_recipe_data_path(r, r->data.test_images, images, sizeof images);
    kd_recipe_data_path(r, r->data.test_labels, labels, sizeof labels);
    if (kd_idx_load(images, labels, &test, err, errlen) != 0) goto fail;
    if (r->data.test_subset > 0 && (size_t)r->data.test_subset < test->n)
        test->n = (size_t)r->data.test_subset;
    out->test = test;
    return 0;
fail:
    kd_dataset_destroy(&full);
    kd_splits_destroy(out);
    return -1;
}

void kd_splits_destroy(kd_splits_t *s) {
    kd_dataset_destroy(&s->train);
    kd_dataset_destroy(&s->val);
    kd_dataset_destroy(&s->test);
}

/* The recipe's GPT for windows of shape_from: vocab from the data unless given; a student's
 * context is the windows', a teacher's must reach it. */
static int gpt_from_recipe(const kd_recipe_t *r, bool teacher, const kd_dataset_t *shape_from,
                           kd_model_t **out, char *err, size_t errlen) {
    kd_gpt_config_t cfg = teacher ? r->teacher.gpt : r->student.gpt;
    const char *which = teacher ? "teacher" : "student";
    if (cfg.vocab == 0) cfg.vocab = shape_from->num_classes;
    if (cfg.vocab < shape_from->num_classes)
        return kd_err(err, errlen, "%s.gpt.vocab %d is smaller than the data's %d token ids", which,
                      cfg.vocab, shape_from->num_classes);
    if (teacher && (size_t)cfg.context + 1 < shape_from->window)
        return kd_err(err, errlen,
                      "teacher.gpt.context %d is shorter than the student's windows (%zu tokens)",
                      cfg.context, shape_from->window - 1);
    char why[KD_ERR_LEN];
    if (kd_model_new_gpt(&cfg, out, why, sizeof why) != 0)
        return kd_err(err, errlen, "%s.%s", which, why);
    kd_model_init_params(*out, kd_rng_key((uint64_t)r->seed, teacher ? 2 : 1, 0x696e6974ULL));
    return 0;
}

int kd_model_from_recipe(const kd_recipe_t *r, bool teacher, const kd_dataset_t *shape_from,
                         kd_model_t **out, char *err, size_t errlen) {
    if ((teacher ? r->teacher.gpt.layers : r->student.gpt.layers) > 0)
        return gpt_from_recipe(r, teacher, shape_from, out, err, errlen);
    const kd_layer_spec_t *layers = teacher ? r->teacher.layers : r->student.layers;
    int n = teacher ? r->teacher.n_layers : r->student.n_layers;
    const char *which = teacher ? "teacher" : "student";
    *out = NULL;
    if (n == 0) return kd_err(err, errlen, "recipe has no %s.layers", which);
    kd_shape_t input = {shape_from->channels, shape_from->height, shape_from->width};
    char why[KD_ERR_LEN];
    kd_model_t *m = NULL;
    if (kd_model_new(layers, n, input, &m, why, sizeof why) != 0)
        return kd_err(err, errlen, "%s.layers: %s", which, why);
    if (m->num_classes != shape_from->num_classes) {
        kd_err(err, errlen,
               "%s.layers: the last layer gives %d outputs but the data has %d classes", which,
               m->num_classes, shape_from->num_classes);
        kd_model_destroy(&m);
        return -1;
    }
    kd_model_init_params(m, kd_rng_key((uint64_t)r->seed, teacher ? 2 : 1, 0x696e6974ULL));
    *out = m;
    return 0;
}

/* Adds the agreement count and the KL sum of B rows of student and teacher logits (C each). */
static void compare_with_teacher(const float *student, const float *teacher, int B, int C,
                                 float *scratch, long *agree, double *kl_sum) {
    float *log_s = scratch, *log_t = scratch + (size_t)B * C;
    kd_log_softmax(student, log_s, B, C, 1.0f);
    kd_log_softmax(teacher, log_t, B, C, 1.0f);
    for (int i = 0; i < B; i++) {
        const float *ls = log_s + (size_t)i * C, *lt = log_t + (size_t)i * C;
        int top_s = 0, top_t = 0;
        double kl = 0;
        for (int c = 0; c < C; c++) {
            if (ls[c] > ls[top_s]) top_s = c;
            if (lt[c] > lt[top_t]) top_t = c;
            kl += exp((double)lt[c]) * ((double)lt[c] - (double)ls[c]);
        }
        *agree += top_s == top_t;
        *kl_sum += kl;
    }
}

void kd_lm_batch_split(kd_lm_batch_t *b, const uint32_t *windows, int B, int T) {
    const size_t n = (size_t)B * T;
    if (n > b->cap) {
        free(b->tokens);
        free(b->targets);
        b->tokens = kd_xmalloc(n * sizeof *b->tokens);
        b->targets = kd_xmalloc(n * sizeof *b->targets);
        b->cap = n;
    }
    for (int i = 0; i < B; i++)
        for (int t = 0; t < T; t++) {
            b->tokens[(size_t)i * T + t] = windows[(size_t)i * (T + 1) + t];
            b->targets[(size_t)i * T + t] = (int32_t)windows[(size_t)i * (T + 1) + t + 1];
        }
}

void kd_lm_batch_free(kd_lm_batch_t *b) {
    free(b->tokens);
    free(b->targets);
    free(b->view_ids);
    free(b->view_vals);
    memset(b, 0, sizeof *b);
}

void kd_lm_teacher_format(const kd_recipe_t *r, int vocab, kd_lm_teacher_t *out) {
    *out = (kd_lm_teacher_t){
        .key = {.n_samples = 1, .n_classes = vocab, .encoding = r->cache.encoding}};
    if (out->key.encoding == KD_ENC_TOPK) out->key.k = (int)r->cache.topk;
    if (out->key.encoding == KD_ENC_SAMPLED) {
        out->key.k = (int)r->cache.samples;
        out->key.sample_temperature = r->distill.loss.temperature;
    }
    out->record_bytes = kd_cache_record_bytes(out->key.encoding, vocab, out->key.k);
}

/* The view buffers for t's records. */
static void view_ready(kd_lm_batch_t *b, const kd_lm_teacher_t *t) {
    size_t need = (size_t)(t->key.k > t->key.n_classes ? t->key.k : t->key.n_classes) + 1;
    if (need <= b->view_cap) return;
    free(b->view_ids);
    free(b->view_vals);
    b->view_ids = kd_xmalloc(need * sizeof *b->view_ids);
    b->view_vals = kd_alloc_floats(need);
    b->view_cap = need;
}

int kd_lm_teacher_check(const kd_lm_teacher_t *t, int B, int T, kd_lm_batch_t *scratch, char *err,
                        size_t errlen) {
    view_ready(scratch, t);
    kd_teacher_row_t v;
    for (size_t p = 0; p < (size_t)B * T; p++)
        if (kd_cache_record_view(&t->key, t->records + p * t->record_bytes, scratch->view_ids,
                                 scratch->view_vals, &v) != 0)
            return kd_err(err, errlen,
                          "teacher record of window %zu position %zu is not a valid %s record "
                          "(a class out of range or a value that is not finite)",
                          p / (size_t)T, p % (size_t)T, kd_cache_encoding_name(t->key.encoding));
    return 0;
}

struct distill_ctx {
    const kd_loss_config_t *loss;
    const kd_lm_teacher_t *teacher;
    kd_lm_batch_t *b;
    int V;
    float inv_count;
    kd_loss_stats_t stats;
};

/* kd_gpt_head's chunk: each position against its teacher record, in place. */
static double distill_chunk(void *ctx_, size_t pos0, size_t n, float *logits, bool grad) {
    struct distill_ctx *c = ctx_;
    const kd_lm_teacher_t *t = c->teacher;
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        const size_t p = pos0 + i;
        kd_teacher_row_t v;
        KD_ASSERT(kd_cache_record_view(&t->key, t->records + p * t->record_bytes, c->b->view_ids,
                                       c->b->view_vals, &v) == 0);
        sum += kd_loss_sparse_row(c->loss, &v, logits + i * (size_t)c->V, c->V, c->b->targets[p],
                                  c->inv_count, grad, &c->stats);
    }
    return sum * c->inv_count;
}

float kd_train_gradient_lm(kd_model_t *m, const uint32_t *windows, int B, uint64_t batch_key,
                           const kd_loss_config_t *loss_cfg, const kd_lm_teacher_t *teacher,
                           kd_lm_batch_t *scratch, kd_loss_stats_t *stats) {
    const int T = m->gpt->cfg.context;
    kd_lm_batch_split(scratch, windows, B, T);
    kd_gpt_forward(m->gpt, scratch->tokens, B, T, true, batch_key);
    if (teacher) {
        KD_ASSERT(teacher->key.n_classes == m->gpt->cfg.vocab);
        view_ready(scratch, teacher);
        struct distill_ctx ctx = {
            loss_cfg,       teacher, scratch, m->gpt->cfg.vocab, 1.0f / (float)((size_t)B * T),
            {.loss_sum = 0}};
        double loss = kd_gpt_head(m->gpt, distill_chunk, &ctx, true);
        kd_gpt_backward(m->gpt);
        if (stats) {
            stats->loss_sum += ctx.stats.loss_sum;
            stats->ce_sum += ctx.stats.ce_sum;
            stats->kd_sum += ctx.stats.kd_sum;
            stats->correct += ctx.stats.correct;
            stats->agree += ctx.stats.agree;
            stats->count += ctx.stats.count;
        }
        return (float)loss;
    }
    size_t correct = 0;
    double loss = kd_gpt_loss(m->gpt, scratch->targets, true, &correct);
    kd_gpt_backward(m->gpt);
    if (stats) {
        stats->loss_sum += loss * B * T;
        stats->ce_sum += loss * B * T;
        stats->correct += (int)correct;
        stats->count += B * T;
    }
    return (float)loss;
}

/* Windows per evaluation pass: the attention probabilities of every layer, B*L*NH*T*T floats,
 * stay under 64 Mi floats. */
static int lm_eval_batch(const kd_gpt_config_t *c, const kd_dataset_t *ds, int want) {
    double T = (double)ds->window - 1, per = (double)c->layers * c->heads * T * T;
    int cap = (int)fmax(1.0, (double)(1 << 26) / per);
    return want < cap ? want : cap;
}

#define ECE_BINS 15

/* What an evaluation adds up over a language model's positions, one head chunk at a time. */
struct lm_eval_ctx {
    const int32_t *targets;
    const float *teacher; /* (positions of this batch, V) or NULL */
    float *logits;        /* (positions of this batch, V) copy-out, or NULL */
    float *scratch;       /* (2 * chunk, V) when teacher */
    int V;
    double loss_sum, kl_sum;
    size_t correct;
    long agree;
    double bin_conf[ECE_BINS], bin_correct[ECE_BINS], bin_count[ECE_BINS];
};

static double lm_eval_chunk(void *ctx_, size_t pos0, size_t n, float *logits, bool grad) {
    (void)grad;
    struct lm_eval_ctx *c = ctx_;
    const int V = c->V;
    if (c->logits) memcpy(c->logits + pos0 * V, logits, n * (size_t)V * sizeof(float));
    if (c->teacher)
        compare_with_teacher(logits, c->teacher + pos0 * V, (int)n, V, c->scratch, &c->agree,
                             &c->kl_sum);
    for (size_t i = 0; i < n; i++) {
        const float *row = logits + i * V;
        const int32_t y = c->targets[pos0 + i];
        int top = 0;
        for (int j = 1; j < V; j++) top = row[j] > row[top] ? j : top; /* the first maximum */
        double z = 0.0;
        for (int j = 0; j < V; j++) z += exp((double)(row[j] - row[top]));
        c->loss_sum += (double)row[top] + log(z) - row[y];
        c->correct += top == y;
        /* calibration: the confidence of the top guess against how often it is right */
        const double conf = 1.0 / z;
        int bin = (int)(conf * ECE_BINS);
        bin = bin >= ECE_BINS ? ECE_BINS - 1 : bin;
        c->bin_conf[bin] += conf;
        c->bin_correct[bin] += top == y;
        c->bin_count[bin] += 1;
    }
    return 0.0;
}

/* teacher (ds->n, T, V) or NULL: compared with position by position. */
static void evaluate_lm(kd_model_t *m, const kd_dataset_t *ds, int batch_size, const float *teacher,
                        kd_eval_t *out, float *logits) {
    const int T = (int)ds->window - 1, V = m->num_classes;
    KD_ASSERT(T <= m->gpt->cfg.context);
    const int Bmax = lm_eval_batch(&m->gpt->cfg, ds, batch_size < 1 ? 64 : batch_size);
    uint32_t *windows = kd_xmalloc((size_t)Bmax * ds->window * sizeof *windows);
    uint32_t *ids = kd_xmalloc((size_t)Bmax * sizeof *ids);
    kd_lm_batch_t lb = {0};
    struct lm_eval_ctx ctx = {.V = V};
    if (teacher) ctx.scratch = kd_alloc_floats(2 * kd_gpt_head_chunk(V) * (size_t)V);
    double bytes = 0.0;
    size_t tokens = 0;
    for (size_t start = 0; start < ds->n; start += (size_t)Bmax) {
        int B = (int)(ds->n - start < (size_t)Bmax ? ds->n - start : (size_t)Bmax);
        for (int i = 0; i < B; i++) ids[i] = (uint32_t)(start + (size_t)i);
        kd_dataset_gather_windows(ds, ids, (size_t)B, windows);
        kd_lm_batch_split(&lb, windows, B, T);
        kd_gpt_forward(m->gpt, lb.tokens, B, T, false, 0);
        ctx.targets = lb.targets;
        ctx.teacher = teacher ? teacher + start * (size_t)T * V : NULL;
        ctx.logits = logits ? logits + start * (size_t)T * V : NULL;
        kd_gpt_head(m->gpt, lm_eval_chunk, &ctx, false);
        tokens += (size_t)B * T;
        bytes += kd_dataset_target_bytes(ds, ids, (size_t)B);
    }
    out->count = tokens;
    out->loss = tokens ? ctx.loss_sum / (double)tokens : NAN;
    out->accuracy = tokens ? (double)ctx.correct / (double)tokens : NAN;
    out->perplexity = exp(out->loss);
    out->bits_per_byte = bytes > 0 ? ctx.loss_sum / (M_LN2 * bytes) : NAN;
    out->agreement = teacher && tokens ? (double)ctx.agree / (double)tokens : NAN;
    out->teacher_kl = teacher && tokens ? ctx.kl_sum / (double)tokens : NAN;
    double ece = 0.0;
    for (int b = 0; b < ECE_BINS; b++)
        if (ctx.bin_count[b] > 0)
            ece += fabs(ctx.bin_correct[b] - ctx.bin_conf[b]) / (double)(tokens ? tokens : 1);
    out->ece = tokens ? ece : NAN;
    free(ctx.scratch);
    kd_lm_batch_free(&lb);
    free(windows);
    free(ids);
}

void kd_evaluate(kd_model_t *m, const kd_dataset_t *ds, int batch_size, const float *teacher,
                 kd_eval_t *out, float *logits) {
    if (m->gpt) {
        evaluate_lm(m, ds, batch_size, teacher, out, logits);
        return;
    }
    out->perplexity = out->bits_per_byte = out->ece = NAN;
    const int C = m->num_classes;
    if (batch_size < 1) batch_size = 256;
    float *x = kd_alloc_floats((size_t)batch_size * ds->sample_dim);
    int32_t *y = kd_xmalloc((size_t)batch_size * sizeof *y);
    uint32_t *ids = kd_xmalloc((size_t)batch_size * sizeof *ids);
    kd_loss_config_t ce = {.divergence = KD_DIV_FORWARD_KL, .temperature = 1.0f, .alpha = 0.0f};
    kd_loss_stats_t stats = {0};
    float *scratch = teacher ? kd_alloc_floats(2 * (size_t)batch_size * C) : NULL;
    long agree = 0;
    double kl_sum = 0;
    for (size_t start = 0; start < ds->n; start += (size_t)batch_size) {
        int B = (int)((ds->n - start < (size_t)batch_size) ? ds->n - start : (size_t)batch_size);
        for (int i = 0; i < B; i++) ids[i] = (uint32_t)(start + (size_t)i);
        kd_dataset_gather(ds, ids, (size_t)B, x, y);
        const float *out_logits = kd_model_forward(m, x, B, false, 0);
        kd_loss(&ce, out_logits, NULL, y, B, C, NULL, &stats);
        if (logits) memcpy(logits + start * (size_t)C, out_logits, (size_t)B * C * sizeof(float));
        if (teacher)
            compare_with_teacher(out_logits, teacher + start * (size_t)C, B, C, scratch, &agree,
                                 &kl_sum);
    }
    out->count = (size_t)stats.count;
    out->loss = stats.count ? stats.loss_sum / stats.count : 0.0;
    out->accuracy = stats.count ? (double)stats.correct / stats.count : 0.0;
    out->agreement = teacher && ds->n ? (double)agree / (double)ds->n : NAN;
    out->teacher_kl = teacher && ds->n ? kl_sum / (double)ds->n : NAN;
    free(scratch);
    free(x);
    free(y);
    free(ids);
}

kd_optim_t *kd_optim_for_gpt(const kd_optim_config_t *cfg, const kd_gpt_t *g) {
    kd_optim_t *opt = kd_optim_new(cfg, g->n_params);
    for (int i = 0; i < g->n_tensors; i++)
        if (!g->tensors[i].decay)
            kd_optim_exempt_decay(opt, g->tensors[i].offset, g->tensors[i].count);
    return opt;
}

kd_optim_t *kd_optim_for_model(const kd_optim_config_t *cfg, const kd_model_t *m) {
    return m->gpt ? kd_optim_for_gpt(cfg, m->gpt) : kd_optim_new(cfg, m->n_params);
}

long kd_train_total_steps(const kd_recipe_t *r, size_t n_train) {
    long steps = r->train.epochs * (long)kd_epoch_count(n_train, (size_t)r->train.batch_size);
    const long cap = r->train.max_steps * r->cluster.accumulate; /* max_steps counts updates */
    if (r->train.max_steps > 0 && cap < steps) steps = cap;
    return steps;
}

void kd_grad_accumulate(float *sum, const float *grad, size_t n, int samples, bool first) {
    const float w = (float)samples;
    if (first)
        for (size_t i = 0; i < n; i++) sum[i] = w * grad[i];
    else
        for (size_t i = 0; i < n; i++) sum[i] += w * grad[i];
}

void kd_grad_mean(float *sum, size_t n, long samples) {
    const float inv = 1.0f / (float)samples;
    for (size_t i = 0; i < n; i++) sum[i] *= inv;
}

uint64_t kd_batch_key(uint64_t seed, uint32_t epoch, uint32_t batch_id) {
    return kd_rng_key(seed, epoch, batch_id);
}

float kd_train_gradient(kd_model_t *m, const kd_loss_config_t *loss, const float *x,
                        const int32_t *labels, const float *teacher, int B, uint64_t batch_key,
                        float *dlogits, kd_loss_stats_t *stats) {
    const float *logits = kd_model_forward(m, x, B, true, batch_key);
    float value = kd_loss(loss, logits, teacher, labels, B, m->num_classes, dlogits, stats);
    kd_model_backward(m, dlogits);
    return value;
}

/* The run's schedule with its horizon filled in. */
static kd_schedule_config_t schedule_for(const kd_recipe_t *r, long total_steps) {
    kd_schedule_config_t s = r->schedule.cfg;
    s.total_steps = total_steps;
    return s;
}

int kd_train_local(const kd_recipe_t *r, kd_model_t *m, kd_model_t *teacher, const kd_splits_t *d,
                   kd_train_progress_fn progress, void *user, kd_train_result_t *res, char *err,
                   size_t errlen) {
    memset(res, 0, sizeof *res);
    const kd_loss_config_t *loss = &r->distill.loss;
    if (loss->alpha > 0 && !teacher)
        return kd_err(err, errlen, "distill.alpha is %g but no teacher model was given",
                      (double)loss->alpha);
    if (d->train->n == 0) return kd_err(err, errlen, "the training split is empty");
    if (m->gpt && teacher)
        return kd_err(err, errlen,
                      "distilling a language model in this process is not supported yet: train "
                      "the GPT student alone (distill.alpha 0)");

    const size_t B_max = (size_t)r->train.batch_size, D = d->train->sample_dim;
    const int C = m->num_classes;
    const long total_steps = kd_train_total_steps(r, d->train->n);
    const kd_schedule_config_t sched = schedule_for(r, total_steps);
    kd_optim_t *opt = kd_optim_for_model(&r->optim.cfg, m);
    float *x = m->gpt ? NULL : kd_alloc_floats(B_max * D);
    int32_t *y = kd_xmalloc(B_max * sizeof *y);
    float *teacher_logits = teacher ? kd_alloc_floats(B_max * (size_t)C) : NULL;
    float *dlogits = m->gpt ? NULL : kd_alloc_floats(B_max * (size_t)C);
    uint32_t *windows = m->gpt ? kd_xmalloc(B_max * d->train->window * sizeof *windows) : NULL;
    kd_lm_batch_t lm = {0};
    const long tokens_per_sample = m->gpt ? (long)d->train->window - 1 : 0;

    /* cluster.accumulate: one update per k batches, of their samples-weighted mean gradient,
     * as a worker pushes them; the last group of an epoch may be smaller. */
    const long k = r->cluster.accumulate;
    float *grad_sum = k > 1 ? kd_alloc_floats(m->n_params) : NULL;
    long held = 0, held_samples = 0;

    const double t0 = kd_now();
    double last_report = t0;
    long step = 0, position = 0, samples = 0, window_samples = 0;
    kd_loss_stats_t window = {0};
    int epoch = 0;
    for (; epoch < r->train.epochs && position < total_steps; epoch++) {
        kd_epoch_t *ep = kd_epoch_new((uint64_t)r->seed, (uint32_t)epoch, d->train->n, B_max);
        kd_loss_stats_t epoch_stats = {0};
        for (size_t b = 0; b < ep->n_batches && position < total_steps; b++) {
            const uint32_t *ids;
            int B = (int)kd_epoch_batch(ep, b, &ids);
            uint64_t key = kd_batch_key((uint64_t)r->seed, (uint32_t)epoch, (uint32_t)b);
            kd_loss_stats_t batch_stats = {0};
            if (m->gpt) {
                kd_dataset_gather_windows(d->train, ids, (size_t)B, windows);
                kd_train_gradient_lm(m, windows, B, key, loss, NULL, &lm, &batch_stats);
            } else {
                kd_dataset_gather(d->train, ids, (size_t)B, x, y);
                if (teacher)
                    memcpy(teacher_logits, kd_model_forward(teacher, x, B, false, 0),
                           (size_t)B * C * sizeof(float));
                kd_train_gradient(m, loss, x, y, teacher_logits, B, key, dlogits, &batch_stats);
            }
            samples += B;
            window_samples += B;
            window.loss_sum += batch_stats.loss_sum;
            window.correct += batch_stats.correct;
            window.count += batch_stats.count;
            epoch_stats.loss_sum += batch_stats.loss_sum;
            epoch_stats.count += batch_stats.count;

            float *grad = m->grads;
            long batches = 1;
            if (grad_sum) {
                kd_grad_accumulate(grad_sum, m->grads, m->n_params, B, held == 0);
                held++;
                held_samples += B;
                if (held < k && b + 1 < ep->n_batches && position + held < total_steps) continue;
                kd_grad_mean(grad_sum, m->n_params, held_samples);
                grad = grad_sum;
                batches = held;
                held = held_samples = 0;
            }
            kd_optim_step(opt, m->params, grad, kd_schedule_lr(&sched, position));
            step++;
            position += batches;

            double now = kd_now();
            if (progress && now - last_report >= 1.0) {
                kd_train_progress_t p = {
                    .epoch = epoch,
                    .step = position,
                    .total_steps = total_steps,
                    .loss = window.loss_sum / window.count,
                    .train_accuracy = (double)window.correct / window.count,
                    .lr = kd_schedule_lr(&sched, position),
                    .samples_per_sec = window_samples / (now - last_report),
                    .tokens_per_sec =
                        (double)(window_samples * tokens_per_sample) / (now - last_report),
                    .elapsed = now - t0,
                };
                progress(&p, user);
                last_report = now;
                window_samples = 0;
                memset(&window, 0, sizeof window);
            }
        }
        kd_epoch_destroy(&ep);
        res->train_loss = epoch_stats.count ? epoch_stats.loss_sum / epoch_stats.count : 0.0;
        if (progress) {
            kd_train_progress_t p = {.epoch = epoch,
                                     .step = position,
                                     .total_steps = total_steps,
                                     .loss = res->train_loss,
                                     .lr = kd_schedule_lr(&sched, position),
                                     .samples_per_sec = samples / (kd_now() - t0),
                                     .tokens_per_sec =
                                         (double)(samples * tokens_per_sample) / (kd_now() - t0),
                                     .elapsed = kd_now() - t0,
                                     .epoch_end = true};
            if (d->val && d->val->n)
                kd_evaluate(m, d->val, (int)r->eval.batch_size, NULL, &p.val, NULL);
            progress(&p, user);
        }
    }
    res->seconds = kd_now() - t0;
    res->steps = step;
    res->epochs = epoch;
    res->samples_per_sec = res->seconds > 0 ? samples / res->seconds : 0.0;
    res->tokens_per_sec = res->samples_per_sec * (double)tokens_per_sample;
    if (d->val && d->val->n) kd_evaluate(m, d->val, (int)r->eval.batch_size, NULL, &res->val, NULL);
    if (d->test && d->test->n)
        kd_evaluate(m, d->test, (int)r->eval.batch_size, NULL, &res->test, NULL);

    kd_optim_destroy(&opt);
    free(x);
    free(y);
    free(teacher_logits);
    free(dlogits);
    free(windows);
    free(grad_sum);
    kd_lm_batch_free(&lm);
    return 0;
}
