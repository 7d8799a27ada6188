/* evaluator: the coordinator's evaluation actor. It owns a copy of the student model and the
 * validation and test sets; the coordinator hands it parameter snapshots and goes on serving
 * workers while it evaluates. At most one snapshot waits: a newer request replaces it, so a
 * fast schedule cannot queue copies of the weights without bound. Results come back over an
 * inproc pipe. It keeps the best weights on disk (never non-finite ones). When the
 * run distils from a teacher whose weights it can load, it also compares the student with the
 * teacher (top-1 agreement, mean KL) on both sets, from teacher logits computed once. A language
 * model also writes a few lines of text at each evaluation (eval.sample_tokens), the same seed
 * every time, so the samples show what training changed. */
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator.h"
#include "kd_checkpoint.h"
#include "kd_log.h"
#include "kd_tokens.h"

/* The teacher's logits kept for comparisons (a language model's are per position). */
#define TEACHER_EVAL_MAX_FLOATS ((size_t)128 << 20)

struct evaluator {
    void *pipe;   /* coordinator's end: results */
    void *worker; /* actor's end */
    pthread_t thread;
    /* the waiting snapshot, under lock: the newest request not yet taken by the actor */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    float *waiting; /* (n_params) */
    long waiting_step;
    bool has_waiting, quit;
    long superseded; /* requests replaced by a newer one before they were evaluated */
    kd_model_t *model;
    const kd_splits_t *data;
    int batch_size;
    kd_recipe_t recipe;
    float *teacher_val, *teacher_test; /* (n, C) the teacher's logits, once computed */
    bool teacher_tried;
    char best_path[KD_PATH_MAX + 64];
    kd_tokenizer_t *tok; /* a language model's, for its samples; NULL: no samples */
    uint32_t *prompt;    /* (n_prompt) what they continue */
    size_t n_prompt;
    int outstanding;
    /* actor state */
    double best_score;
    long best_step;
    int evals_since_best;
};

/* The teacher's logits on the validation and test sets, if the recipe names a teacher this
 * process can load (with only imported logits there is nothing to compare with). */
static void load_teacher_logits(evaluator_t *ev) {
    ev->teacher_tried = true;
    const kd_recipe_t *r = &ev->recipe;
    if (r->distill.loss.alpha <= 0 || !r->teacher.checkpoint[0] || r->cache.import[0]) return;
    kd_model_t *t = NULL;
    char err[KD_ERR_LEN];
    if (kd_model_from_recipe(r, true, ev->data->test, &t, err, sizeof err) != 0 ||
        kd_checkpoint_load(t, r->teacher.checkpoint, err, sizeof err) != 0) {
        kd_log(KD_LOG_WARN, "COORD-EVAL-TEACHER", "no teacher comparison: %s", err);
        kd_model_destroy(&t);
        return;
    }
    if (t->num_classes != ev->model->num_classes) { /* a padded vocabulary */
        kd_log(KD_LOG_INFO, "COORD-EVAL-TEACHER",
               "no teacher comparison: the teacher has %d classes, the student %d", t->num_classes,
               ev->model->num_classes);
        kd_model_destroy(&t);
        return;
    }
    /* per sample: a classifier's logits; a language model's, every position's */
    const size_t C = (size_t)t->num_classes * (t->gpt ? ev->data->test->window - 1 : 1);
    const size_t floats = C * ((ev->data->val ? ev->data->val->n : 0) + ev->data->test->n);
    if (floats > TEACHER_EVAL_MAX_FLOATS) {
        kd_log(KD_LOG_INFO, "COORD-EVAL-TEACHER",
               "no teacher comparison: the teacher's logits on the validation and test sets "
               "would take %.1f GB (evaluate fewer windows: data.val_windows, data.test_windows)",
               (double)floats * 4.0 / 1e9);
        kd_model_destroy(&t);
        return;
    }
    kd_eval_t unused;
    if (ev->data->val && ev->data->val->n) {
        ev->teacher_val = kd_alloc_floats(ev->data->val->n * C);
        kd_evaluate(t, ev->data->val, ev->batch_size, NULL, &unused, ev->teacher_val);
    }
    if (ev->data->test && ev->data->test->n) {
        ev->teacher_test = kd_alloc_floats(ev->data->test->n * C);
        kd_evaluate(t, ev->data->test, ev->batch_size, NULL, &unused, ev->teacher_test);
        kd_log(KD_LOG_INFO, "COORD-EVAL-TEACHER", "the teacher's test accuracy: %.4f",
               unused.accuracy);
    }
    kd_model_destroy(&t);
}

#define BEST_METADATA "kdist.best"

/* The model as best/student.safetensors, with its step and score beside the weights, so a
 * resumed coordinator knows what it has to beat even when the best came after the checkpoint. */
static int save_best(evaluator_t *ev, char *err, size_t errlen) {
    char meta[128];
    snprintf(meta, sizeof meta, "{\"step\": %ld, \"score\": %.17g, \"metric\": \"%s\"}",
             ev->best_step, ev->best_score, ev->model->gpt ? "-val_loss" : "val_accuracy");
    kd_st_writer_t *w = kd_st_writer_new();
    kd_checkpoint_add_model(w, ev->model);
    kd_st_writer_metadata(w, BEST_METADATA, meta);
    int rc = kd_st_writer_write(w, ev->best_path, err, errlen);
    kd_st_writer_destroy(&w);
    return rc;
}

int evaluator_read_best(const char *best_path, evaluator_best_t *out) {
    kd_safetensors_t *st = NULL;
    char err[KD_ERR_LEN];
    if (!kd_file_exists(best_path) || kd_st_open(best_path, &st, err, sizeof err) != 0) return -1;
    const char *meta = kd_st_metadata(st, BEST_METADATA);
    json_error_t jerr;
    json_t *j = meta ? json_loads(meta, 0, &jerr) : NULL;
    json_int_t step = -1;
    double acc = 0;
    /* "score"; files of kdist before it kept "val_accuracy" */
    if (j && !json_object_get(j, "score"))
        json_object_set(j, "score", json_object_get(j, "val_accuracy"));
    int rc = j && json_unpack(j, "{s:I, s:F}", "step", &step, "score", &acc) == 0 && step >= 0 &&
                     isfinite(acc)
                 ? 0
                 : -1;
    if (rc == 0) {
        out->step = (long)step;
        out->score = acc;
    }
    json_decref(j);
    kd_st_close(&st);
    return rc;
}

/* The model's text after its prompt (ev->prompt) into out (EVAL_SAMPLE_BYTES), repaired to
 * UTF-8 and cut at a character boundary when long. */
#define SAMPLE_TEMPERATURE 0.8f
#define SAMPLE_TOP_K       40
#define SAMPLE_PROMPT_MAX  16 /* tokens of validation text when the recipe gives no prompt */
static void sample_text(evaluator_t *ev, char *out) {
    const kd_recipe_t *r = &ev->recipe;
    char *text = NULL, err[KD_ERR_LEN];
    size_t len = 0;
    out[0] = '\0';
    if (kd_gpt_sample_text(ev->model->gpt, ev->tok, ev->prompt, ev->n_prompt, true,
                           (size_t)r->eval.sample_tokens, SAMPLE_TEMPERATURE, SAMPLE_TOP_K,
                           kd_rng_key((uint64_t)r->seed, 0x73616d70 /* "samp" */, 0), &text, &len,
                           err, sizeof err) != 0) {
        kd_log(KD_LOG_WARN, "COORD-SAMPLE", "no text sample: %s", err);
        return;
    }
    char *repaired = kd_xmalloc(3 * len + 1);
    size_t n = kd_utf8_repair(text, len, repaired);
    if (n >= EVAL_SAMPLE_BYTES) { /* back to the start of a character */
        n = EVAL_SAMPLE_BYTES - 1;
        while (n > 0 && ((uint8_t)repaired[n] & 0xc0) == 0x80) n--;
    }
    memcpy(out, repaired, n);
    out[n] = '\0';
    free(repaired);
    free(text);
}

/* What the samples continue: eval.sample_prompt, or the start of the validation (else test)
 * text: a model that never saw end-of-text (one file) cannot start a document from it. Opens
 * the tokenizer; false (logged) when there will be no samples. */
static bool prepare_samples(evaluator_t *ev) {
    const kd_recipe_t *r = &ev->recipe;
    char err[KD_ERR_LEN];
    if (kd_tokens_open_tokenizer(r, &ev->tok, err, sizeof err) != 0) {
        kd_log(KD_LOG_WARN, "COORD-SAMPLE", "no text samples: %s", err);
        return false;
    }
    size_t cap = 0;
    if (r->eval.sample_prompt[0]) {
        if (kd_tokenizer_encode(ev->tok, r->eval.sample_prompt, strlen(r->eval.sample_prompt),
                                &ev->prompt, &ev->n_prompt, &cap, err, sizeof err) != 0)
            kd_log(KD_LOG_WARN, "COORD-SAMPLE", "no text samples: eval.sample_prompt: %s", err);
        return ev->n_prompt > 0;
    }
    const kd_dataset_t *from = ev->data->val && ev->data->val->n ? ev->data->val : ev->data->test;
    if (!from || from->n == 0) return false;
    ev->n_prompt = from->window - 1 < SAMPLE_PROMPT_MAX ? from->window - 1 : SAMPLE_PROMPT_MAX;
    ev->prompt = kd_xmalloc(ev->n_prompt * sizeof *ev->prompt);
    memcpy(ev->prompt, from->tokens, ev->n_prompt * sizeof *ev->prompt);
    return ev->n_prompt > 0;
}

/* What "best" means, higher is better: a classifier's validation accuracy, a language model's
 * validation loss negated (next-token accuracy rewards confident top-1 guesses, not the
 * calibrated distribution a language model is trained and distilled for). */
static double score_of(const kd_model_t *m, const kd_eval_t *val) {
    return m->gpt ? -val->loss : val->accuracy;
}

/* Waits for a snapshot and copies it into the model; false when told to quit. */
static bool take_snapshot(evaluator_t *ev, long *step) {
    pthread_mutex_lock(&ev->lock);
    while (!ev->has_waiting && !ev->quit) pthread_cond_wait(&ev->wake, &ev->lock);
    bool go = !ev->quit;
    if (go) {
        memcpy(ev->model->params, ev->waiting, ev->model->n_params * sizeof(float));
        *step = ev->waiting_step;
        ev->has_waiting = false;
    }
    pthread_mutex_unlock(&ev->lock);
    return go;
}

static void *evaluator_main(void *arg) {
    evaluator_t *ev = arg;
    long step;
    while (take_snapshot(ev, &step)) {
        if (!ev->teacher_tried) load_teacher_logits(ev);
        eval_result_t res = {.step = step};
        if (ev->data->val && ev->data->val->n)
            kd_evaluate(ev->model, ev->data->val, ev->batch_size, ev->teacher_val, &res.val, NULL);
        if (ev->data->test && ev->data->test->n)
            kd_evaluate(ev->model, ev->data->test, ev->batch_size, ev->teacher_test, &res.test,
                        NULL);
        /* non-finite weights are never the best, whatever their accuracy */
        char err[KD_ERR_LEN];
        bool finite = kd_checkpoint_check_finite(ev->model, ev->best_path, err, sizeof err) == 0;
        const double score = score_of(ev->model, &res.val);
        res.improved = finite && !isnan(score) && (ev->best_step < 0 || score > ev->best_score);
        if (res.improved) {
            ev->best_score = score;
            ev->best_step = step;
            ev->evals_since_best = 0;
            if (save_best(ev, err, sizeof err) != 0)
                kd_log(KD_LOG_ERROR, "COORD-BEST-SAVE", "%s", err);
        } else {
            ev->evals_since_best++;
        }
        res.best_step = ev->best_step;
        res.best_score = ev->best_score;
        res.evals_since_best = ev->evals_since_best;
        if (ev->tok && finite) sample_text(ev, res.sample);
        zmq_send(ev->worker, &res, sizeof res, 0);
    }
    return NULL;
}

evaluator_t *evaluator_new(void *ctx, const kd_recipe_t *r, const kd_model_t *model,
                           const kd_splits_t *data, const char *best_path,
                           const evaluator_best_t *best) {
    evaluator_t *ev = kd_xcalloc(1, sizeof *ev);
    char endpoint[64];
    snprintf(endpoint, sizeof endpoint, "inproc://evaluator-%p", (void *)ev);
    ev->pipe = zmq_socket(ctx, ZMQ_PAIR);
    ev->worker = zmq_socket(ctx, ZMQ_PAIR);
    int zero = 0;
    zmq_setsockopt(ev->pipe, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(ev->worker, ZMQ_LINGER, &zero, sizeof zero);
    zmq_bind(ev->pipe, endpoint);
    zmq_connect(ev->worker, endpoint);
    char err[KD_ERR_LEN];
    if (kd_model_new_like(model, &ev->model, err, sizeof err) != 0)
        KD_ASSERT(!"the coordinator's own model spec is valid");
    ev->data = data;
    ev->batch_size = (int)r->eval.batch_size;
    ev->recipe = *r;
    snprintf(ev->best_path, sizeof ev->best_path, "%s", best_path);
    ev->best_step = best ? best->step : -1;
    ev->best_score = best ? best->score : 0;
    ev->evals_since_best = best ? best->evals_since : 0;
    ev->waiting = kd_alloc_floats(model->n_params);
    if (model->gpt && r->eval.sample_tokens > 0 && !prepare_samples(ev))
        kd_tokenizer_destroy(&ev->tok);
    pthread_mutex_init(&ev->lock, NULL);
    pthread_cond_init(&ev->wake, NULL);
    pthread_create(&ev->thread, NULL, evaluator_main, ev);
    return ev;
}

void evaluator_request(evaluator_t *ev, const float *params, long step) {
    pthread_mutex_lock(&ev->lock);
    if (ev->has_waiting)
        ev->superseded++; /* its result will never come: the newer one answers instead */
    else
        ev->outstanding++;
    memcpy(ev->waiting, params, ev->model->n_params * sizeof(float));
    ev->waiting_step = step;
    ev->has_waiting = true;
    pthread_cond_signal(&ev->wake);
    pthread_mutex_unlock(&ev->lock);
}

long evaluator_superseded(evaluator_t *ev) {
    pthread_mutex_lock(&ev->lock);
    long n = ev->superseded;
    pthread_mutex_unlock(&ev->lock);
    return n;
}

void *evaluator_socket(evaluator_t *ev) {
    return ev->pipe;
}

int evaluator_result(evaluator_t *ev, eval_result_t *out) {
    if (zmq_recv(ev->pipe, out, sizeof *out, ZMQ_DONTWAIT) != (int)sizeof *out) return -1;
    ev->outstanding--;
    return 0;
}

int evaluator_next(evaluator_t *ev, eval_result_t *out) {
    if (ev->outstanding <= 0) return -1;
    if (zmq_recv(ev->pipe, out, sizeof *out, 0) != (int)sizeof *out) return -1;
    ev->outstanding--;
    return 0;
}

void evaluator_destroy(evaluator_t **self_p) {
    evaluator_t *ev = *self_p;
    if (!ev) return;
    pthread_mutex_lock(&ev->lock);
    ev->quit = true;
    pthread_cond_signal(&ev->wake);
    pthread_mutex_unlock(&ev->lock);
    pthread_join(ev->thread, NULL);
    pthread_mutex_destroy(&ev->lock);
    pthread_cond_destroy(&ev->wake);
    free(ev->waiting);
    zmq_close(ev->pipe);
    zmq_close(ev->worker);
    kd_model_destroy(&ev->model);
    kd_tokenizer_destroy(&ev->tok);
    free(ev->prompt);
    free(ev->teacher_val);
    free(ev->teacher_test);
    free(ev);
    *self_p = NULL;
}
