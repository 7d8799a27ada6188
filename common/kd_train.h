/* kd_train: the in-process training loop over the numerical core — the reference that the
 * distributed engine must reproduce, and what the benchmarks time. One step is split exactly
 * as the cluster splits it: a worker's gradient (kd_train_gradient) and the server-side update
 * (kd_optim_step at kd_schedule_lr), so a sync run with one worker computes the same numbers.
 * Not thread-safe: a trainer owns its model, optimizer and scratch. */
#ifndef KD_TRAIN_H
#define KD_TRAIN_H

#include <stdbool.h>
#include <stdio.h>

#include "kd_data.h"
#include "kd_loss.h"
#include "kd_model.h"
#include "kd_optim.h"
#include "kd_recipe.h"

/* The recipe's data: training file minus the validation hold-out, validation, test. */
typedef struct {
    kd_dataset_t *train, *val, *test;
} kd_splits_t;

/* Loads and splits as the recipe says (data.*: files, val_size, train_subset, test_subset;
 * the validation split is keyed by the recipe seed). Errors name the file. */
int kd_splits_load(const kd_recipe_t *r, kd_splits_t *out, char *err, size_t errlen);
void kd_splits_destroy(kd_splits_t *s);

/* Builds the recipe's student (or teacher) model for the dataset's sample shape and class
 * count, and checks the last layer emits num_classes logits. Params are initialised from seed.
 * Caller owns *out. */
int kd_model_from_recipe(const kd_recipe_t *r, bool teacher, const kd_dataset_t *shape_from,
                         kd_model_t **out, char *err, size_t errlen);

typedef struct {
    double loss;     /* mean cross-entropy */
    double accuracy; /* fraction correct */
    size_t count;
    /* Against the teacher's logits, when given (else NAN): the fraction of samples where the
     * student's top-1 class is the teacher's, and the mean KL(teacher || student) at T = 1. */
    double agreement, teacher_kl;
    /* Language models (a GPT on token windows; else NAN): loss and accuracy are per token
     * (count tokens), perplexity exp(loss), bits per byte the loss in bits over the bytes of
     * text the targets stand for (comparable across tokenizers; NAN when unknown). */
    double perplexity, bits_per_byte;
    /* Language models: expected calibration error of the top-1 guess (15 equal bins of
     * confidence; NAN for classifiers). */
    double ece;
} kd_eval_t;

/* Evaluates m (dropout off) on every sample of ds in batches. teacher (ds->n, C), when not
 * NULL, is compared with; logits (ds->n, C) is filled when not NULL. A GPT on windows: teacher
 * and logits (ds->n, context, vocab), compared position by position; batches are capped to
 * bound the attention's memory. */
void kd_evaluate(kd_model_t *m, const kd_dataset_t *ds, int batch_size, const float *teacher,
                 kd_eval_t *out, float *logits);

/* The recipe's optimizer for m's parameters; a GPT's biases and layernorm gains are exempt
 * from weight decay (nanoGPT's parameter groups). Caller owns the result. */
kd_optim_t *kd_optim_for_model(const kd_optim_config_t *cfg, const kd_model_t *m);
kd_optim_t *kd_optim_for_gpt(const kd_optim_config_t *cfg, const kd_gpt_t *g);

/* Batches of a whole run, the schedule's horizon: epochs x batches per epoch, capped by
 * train.max_steps updates of cluster.accumulate batches each (an update per batch when 1). */
long kd_train_total_steps(const kd_recipe_t *r, size_t n_train);

/* cluster.accumulate, as a worker and the in-process trainer do it: the gradient of a batch of
 * `samples` added to sum with that weight (sum set on the first), then the sum of all
 * `samples` turned into their mean: the gradient of the k batches as one. */
void kd_grad_accumulate(float *sum, const float *grad, size_t n, int samples, bool first);
void kd_grad_mean(float *sum, size_t n, long samples);

/* Randomness of one batch (dropout masks) depends only on (seed, epoch, batch_id). */
uint64_t kd_batch_key(uint64_t seed, uint32_t epoch, uint32_t batch_id);

/* Worker half of a step: forward, loss, backward on one batch. x (B, D), labels (B), teacher
 * logits (B, C) or NULL, dlogits (B, C) caller's scratch. Leaves the gradient of the mean loss
 * in m->grads; returns the loss. */
float kd_train_gradient(kd_model_t *m, const kd_loss_config_t *loss, const float *x,
                        const int32_t *labels, const float *teacher, int B, uint64_t batch_key,
                        float *dlogits, kd_loss_stats_t *stats);

/* A GPT batch: windows (B, T+1) as inputs (B,T) and next-token targets (B,T); grown to fit. */
typedef struct {
    uint32_t *tokens;
    int32_t *targets;
    size_t cap;
    uint32_t *view_ids; /* a teacher record's view (kd_cache_record_view) */
    float *view_vals;
    size_t view_cap;
} kd_lm_batch_t;

/* A language model's teacher as a batch carries it: one record per position in a cache
 * encoding (kd_cache.h), decoded position by position as the loss needs it. */
typedef struct {
    kd_cache_key_t key; /* encoding, k, sample_temperature, n_classes (fingerprints unused) */
    size_t record_bytes;
    const uint8_t *records; /* (B, T, record_bytes) */
} kd_lm_teacher_t;

/* The records the recipe's teacher nodes send for a vocabulary: cache.encoding with cache.topk
 * or cache.samples (drawn at distill.temperature). records stays NULL. */
void kd_lm_teacher_format(const kd_recipe_t *r, int vocab, kd_lm_teacher_t *out);
/* Checks every record of B windows of T positions (kd_cache_record_view). 0, or -1 with err
 * naming the window and position. */
int kd_lm_teacher_check(const kd_lm_teacher_t *t, int B, int T, kd_lm_batch_t *scratch, char *err,
                        size_t errlen);

void kd_lm_batch_split(kd_lm_batch_t *b, const uint32_t *windows, int B, int T);
void kd_lm_batch_free(kd_lm_batch_t *b);

/* Worker half of a GPT step: forward, loss and backward on windows (B, context + 1). The loss is
 * the mean next-token cross-entropy or, with a teacher (NULL: none; its records checked by
 * kd_lm_teacher_check), loss's mix of it with the divergence to the teacher at every position
 * (kd_loss_sparse_row), averaged over the positions. Leaves the gradient in m->grads; stats
 * get per-token sums (count tokens); returns the loss. */
float kd_train_gradient_lm(kd_model_t *m, const uint32_t *windows, int B, uint64_t batch_key,
                           const kd_loss_config_t *loss, const kd_lm_teacher_t *teacher,
                           kd_lm_batch_t *scratch, kd_loss_stats_t *stats);

typedef struct {
    int epoch; /* 0-based */
    long step; /* optimizer steps taken */
    long total_steps;
    double loss; /* mean training loss over the last reporting window */
    double train_accuracy;
    double lr;
    double samples_per_sec;
    double tokens_per_sec; /* language models; else 0 */
    double elapsed;        /* seconds since the start */
    bool epoch_end;        /* val is valid */
    kd_eval_t val;
} kd_train_progress_t;

typedef void (*kd_train_progress_fn)(const kd_train_progress_t *p, void *user);

typedef struct {
    long steps;
    int epochs;
    double seconds;
    double samples_per_sec;
    double tokens_per_sec; /* language models; else 0 */
    double train_loss;     /* last epoch's mean */
    kd_eval_t val, test;
} kd_train_result_t;

/* Trains m in this process as the recipe says: per-epoch batches (kd_epoch_t), the recipe's
 * loss, optimizer and schedule. teacher (may be NULL) supplies logits when distill.alpha > 0.
 * progress (may be NULL) is called about once a second and at every epoch end. */
int kd_train_local(const kd_recipe_t *r, kd_model_t *m, kd_model_t *teacher, const kd_splits_t *d,
                   kd_train_progress_fn progress, void *user, kd_train_result_t *res, char *err,
                   size_t errlen);

#endif
