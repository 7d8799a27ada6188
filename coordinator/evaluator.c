/* evaluator: the coordinator's evaluation actor. It owns a copy of the student model and the
 * validation and test sets; the coordinator sends it parameter snapshots over an inproc pipe
 * and goes on serving workers while it evaluates. It keeps the best weights on disk. When the
 * run distils from a teacher whose weights it can load, it also compares the student with the
 * teacher (top-1 agreement, mean KL) on both sets, from teacher logits computed once. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator.h"
#include "kd_checkpoint.h"
#include "kd_log.h"

typedef struct {
    long step;
    float *params; /* owned by the message; NULL = quit */
} eval_request_t;

struct evaluator {
    void *pipe;   /* coordinator's end */
    void *worker; /* actor's end */
    pthread_t thread;
    kd_model_t *model;
    const kd_splits_t *data;
    int batch_size;
    kd_recipe_t recipe;
    float *teacher_val, *teacher_test; /* (n, C) the teacher's logits, once computed */
    bool teacher_tried;
    char best_path[KD_PATH_MAX + 64];
    int outstanding;
    /* actor state */
    double best_val_accuracy;
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
    const size_t C = (size_t)t->num_classes;
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

static void *evaluator_main(void *arg) {
    evaluator_t *ev = arg;
    for (;;) {
        eval_request_t req;
        if (zmq_recv(ev->worker, &req, sizeof req, 0) != (int)sizeof req || !req.params) break;
        if (!ev->teacher_tried) load_teacher_logits(ev);
        memcpy(ev->model->params, req.params, ev->model->n_params * sizeof(float));
        eval_result_t res = {.step = req.step};
        if (ev->data->val && ev->data->val->n)
            kd_evaluate(ev->model, ev->data->val, ev->batch_size, ev->teacher_val, &res.val, NULL);
        if (ev->data->test && ev->data->test->n)
            kd_evaluate(ev->model, ev->data->test, ev->batch_size, ev->teacher_test, &res.test,
                        NULL);
        res.improved = ev->best_step < 0 || res.val.accuracy > ev->best_val_accuracy;
        if (res.improved) {
            ev->best_val_accuracy = res.val.accuracy;
            ev->best_step = req.step;
            ev->evals_since_best = 0;
            char err[KD_ERR_LEN];
            if (kd_checkpoint_save(ev->model, ev->best_path, err, sizeof err) != 0)
                kd_log(KD_LOG_ERROR, "COORD-BEST-SAVE", "%s", err);
        } else {
            ev->evals_since_best++;
        }
        res.best_step = ev->best_step;
        res.best_val_accuracy = ev->best_val_accuracy;
        res.evals_since_best = ev->evals_since_best;
        free(req.params);
        zmq_send(ev->worker, &res, sizeof res, 0);
    }
    return NULL;
}

evaluator_t *evaluator_new(void *ctx, const kd_recipe_t *r, const kd_model_t *model,
                           const kd_splits_t *data, const char *best_path) {
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
    kd_layer_spec_t specs[KD_MAX_LAYERS];
    for (int i = 0; i < model->n_layers; i++) specs[i] = model->layers[i].spec;
    if (kd_model_new(specs, model->n_layers, model->input, &ev->model, err, sizeof err) != 0)
        KD_ASSERT(!"the coordinator's own model spec is valid");
    ev->data = data;
    ev->batch_size = (int)r->eval.batch_size;
    ev->recipe = *r;
    snprintf(ev->best_path, sizeof ev->best_path, "%s", best_path);
    ev->best_step = -1;
    pthread_create(&ev->thread, NULL, evaluator_main, ev);
    return ev;
}

void evaluator_request(evaluator_t *ev, const float *params, long step) {
    eval_request_t req = {.step = step, .params = kd_xmalloc(ev->model->n_params * sizeof(float))};
    memcpy(req.params, params, ev->model->n_params * sizeof(float));
    zmq_send(ev->pipe, &req, sizeof req, 0);
    ev->outstanding++;
}

void *evaluator_socket(evaluator_t *ev) {
    return ev->pipe;
}

int evaluator_result(evaluator_t *ev, eval_result_t *out) {
    if (zmq_recv(ev->pipe, out, sizeof *out, ZMQ_DONTWAIT) != (int)sizeof *out) return -1;
    ev->outstanding--;
    return 0;
}

int evaluator_drain(evaluator_t *ev, eval_result_t *last) {
    int got = -1;
    while (ev->outstanding > 0) {
        if (zmq_recv(ev->pipe, last, sizeof *last, 0) != (int)sizeof *last) return -1;
        ev->outstanding--;
        got = 0;
    }
    return got;
}

void evaluator_destroy(evaluator_t **self_p) {
    evaluator_t *ev = *self_p;
    if (!ev) return;
    eval_request_t quit = {.step = -1, .params = NULL};
    zmq_send(ev->pipe, &quit, sizeof quit, 0);
    pthread_join(ev->thread, NULL);
    zmq_close(ev->pipe);
    zmq_close(ev->worker);
    kd_model_destroy(&ev->model);
    free(ev->teacher_val);
    free(ev->teacher_test);
    free(ev);
    *self_p = NULL;
}
