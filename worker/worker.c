/* kdist-worker: a stateless student worker (DESIGN §2-3, docs/protocol.md). Gets model, recipe,
 * weights and teacher endpoints from the coordinator's Welcome; then, batch after batch, pulls
 * a batch from the teachers, computes the gradient, pushes it and waits for the answer.
 * One thread, one zmq_poll loop; nothing is allocated per step.
 *   usage: kdist-worker --coordinator ENDPOINT [--id ID] [--threads N] [--log FILE]
 *                       [--key FILE --coordinator-key FILE|Z85] */
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kd_checkpoint.h"
#include "kd_curve.h"
#include "kd_log.h"
#include "kd_node.h"
#include "kd_recipe.h"
#include "kd_session.h"
#include "kd_shm.h"
#include "kd_train.h"
#include "kd_util.h"
#include "kd_wire.h"

#define MAX_TEACHERS    1024 /* teacher endpoints a worker follows; more are refused */
#define ENDPOINT_MAX    512
#define WAITING_AFTER   0.020 /* s without a batch before the coordinator hears we are idle */
#define MAX_INPUT_DIM   4096
#define MAX_SAMPLE_SIZE (1 << 24)
#define MAX_CLASSES     (1 << 20)
#define SPEC_MAX        4096

typedef enum { ST_HELLO, ST_IDLE, ST_WAIT_WEIGHTS } worker_state_t;

typedef struct {
    /* options */
    const char *coordinator, *log_path;
    const char *key_opt, *coordinator_key_opt;
    char id[128];
    int threads;

    /* CurveZMQ: given a key pair, every connection is a CURVE client: of the coordinator's key,
     * and of each teacher's key that Welcome and Peers bring (the coordinator authenticated it) */
    bool curve_on;
    kd_curve_client_t curve;
    kd_curve_watch_t pull_watch; /* handshakes with the teachers */
    kd_log_limit_t stream_limit;

    void *ctx, *pull;
    kd_session_t *session; /* with the coordinator */
    worker_state_t state;

    /* From the Welcome. */
    kd_recipe_t recipe;
    kd_model_t *model;
    char run_id[128];
    int num_classes;
    size_t sample_dim;
    uint64_t version, clock;
    char **endpoints; /* (n_endpoints) connected PULL endpoints: the last list, as connected */
    int n_endpoints;

    /* Step buffers: cluster.accumulate slots of recipe.train.batch_size rows each; held
     * batch j is at row j * batch_cap. */
    size_t batch_cap;
    float *x;          /* (B, C*H*W) */
    int32_t *y;        /* (B) */
    float *dlogits;    /* (B, num_classes), one batch's */
    float *teacher;    /* (B, num_classes) the teacher's logits when distilling, else NULL */
    uint32_t *windows; /* (B, context + 1) a language model's token windows, else NULL */
    kd_lm_batch_t lm;  /* their inputs and targets */
    /* A language model's teacher when distilling (records NULL otherwise): the batch's records
     * (B, context, record_bytes), copied from the message, in the cache's encoding */
    kd_lm_teacher_t lm_teacher;
    uint8_t *lm_records;

    /* The batches in hand: one, or up to cluster.accumulate whose gradients one push sums
     * (into grad_sum: the gradient segment's slot, or accumulate_sum). */
    struct {
        uint32_t epoch, batch_id;
        int B;
    } held[KD_MAX_ACCUMULATE];
    int n_held;
    long held_samples;
    double held_since, held_wait, held_compute; /* phases of the push being gathered */
    float *grad_sum, *accumulate_sum;
    uint64_t batches_left; /* of the epoch, at the last answer (0 = none or unknown) */

    /* cluster.topk_fraction over TCP: the topk_k largest values of residual + gradient go out;
     * what was not sent is residual_next, which becomes residual once that push is applied (a
     * push not applied leaves residual as it was: its batches come again). */
    size_t topk_k;
    float *residual, *residual_next, *topk_scratch;
    int32_t *topk_index;
    void *topk_values;
    bool topk_pending;
    kd_loss_stats_t stats;

    /* Zero-copy gradient: ZeroMQ reads model->grads (or wire_grads, the gradient packed for a
     * 16-bit cluster.wire) until it calls release_grads. */
    atomic_int grads_in_flight;
    void *wire_grads;

    /* cluster.overlap: the next version's weights as WeightsChunk messages bring them, in
     * order: [0, wchunk_next) of wchunk_version written into own_params so far */
    size_t wchunk_next;
    uint64_t wchunk_version;
    float *norm_scratch; /* (n_params) a 16-bit gradient unpacked, for its declared norm */

    /* On the coordinator's machine: the weights and gradient travel through these (kd_shm.h),
     * used in place: model->params then points into the weights slot of the last answer
     * (params_slot, slot + 1; the coordinator keeps it until our next push) and model->grads into
     * the gradient slot. own_params/own_grads are the model's own buffers. */
    kd_shm_t weights_shm, grad_shm;
    float *own_params, *own_grads;
    uint32_t params_slot;
    uint64_t params_seq;

    /* Timing: phase_seconds of the push being prepared; wait-weights is the previous step's. */
    double idle_since, push_done, push_seconds, wait_weights;
    bool waiting_announced;
    bool told_to_wait; /* SSP: answered "wait"; the weights come when the slowest catch up */
    double fwd_before[KD_MAX_LAYERS], bwd_before[KD_MAX_LAYERS];
    double fwd[KD_MAX_LAYERS], bwd[KD_MAX_LAYERS];

    /* Counters and rate limits. */
    uint64_t steps, samples, dropped, nacks;
    double report_t, report_samples;
    kd_log_limit_t drop_limit, step_limit;
} worker_t;

enum { KEEP_GOING = KD_SESSION_GO_ON, STOP_NOW = KD_SESSION_STOP, FATAL = KD_SESSION_FAIL };

static void usage(FILE *out) {
    fprintf(out, "usage: kdist-worker --coordinator ENDPOINT [--id ID] [--threads N] [--log FILE]\n"
                 "                    [--key FILE --coordinator-key FILE|Z85]\n"
                 "  --key FILE  this worker's CurveZMQ key pair (kdist keygen), for runs with\n"
                 "              cluster.security.curve (default: $KDIST_KEY)\n"
                 "  --coordinator-key  the coordinator's public key, Z85 or a key file (default:\n"
                 "              $KDIST_COORDINATOR_KEY)\n");
}

/* Network input that does not check out: count it, say so at most once a second. */
static void drop(worker_t *w, const char *from, const char *what) {
    w->dropped++;
    if (kd_log_allow(&w->drop_limit, 1.0))
        kd_log(KD_LOG_WARN, "KD-WIRE-DROP", "from %s: %s (%llu dropped so far)", from, what,
               (unsigned long long)w->dropped);
}

/* ---- sending ----------------------------------------------------------------------------- */

static void send_heartbeat(worker_t *w, bool waiting) {
    Kdist__Heartbeat hb = KDIST__HEARTBEAT__INIT;
    hb.waiting_for_batch = waiting;
    hb.weights_version = w->version;
    hb.messages_dropped = w->dropped;
    kd_session_heartbeat(w->session, &hb);
}

/* ZeroMQ is done with one of the messages that carry the gradient (a chunked push has many). */
static void release_grads(void *data, void *hint) {
    (void)data;
    atomic_fetch_sub((atomic_int *)hint, 1);
}

/* model->grads may be written again only when ZeroMQ has let go of the last push. By then the
 * coordinator has answered, so this normally returns at once. */
static void wait_grads_released(worker_t *w) {
    double t0 = kd_now();
    bool told = false;
    while (atomic_load(&w->grads_in_flight)) {
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
        if (!told && kd_now() - t0 > 1.0) {
            kd_log(KD_LOG_WARN, "WORKER-GRADS-BUSY", "ZeroMQ still holds the last gradient");
            told = true;
        }
    }
}

/* ---- connection -------------------------------------------------------------------------- */

static bool connected(const worker_t *w) {
    return kd_session_socket(w->session) != NULL;
}

/* The coordinator is gone or forgot us: drop the connection and the batch in hand (the
 * coordinator streams it again) and say hello again after the back-off. */
static void lose_coordinator(worker_t *w, const char *why) {
    kd_session_lose(w->session, why);
    w->state = ST_HELLO;
    w->n_held = 0;
    w->topk_pending = false;
}

static int find_endpoint(char *const *list, int n, const char *ep) {
    for (int i = 0; i < n; i++)
        if (list[i] && strcmp(list[i], ep) == 0) return i;
    return -1;
}

/* Follows the teacher set of a Welcome or Peers exactly: the PULL connects to every listed
 * endpoint not connected yet (under CurveZMQ as a client of the teacher's key at the same
 * position in keys) and disconnects from every one no longer listed, so that whoever binds a
 * departed teacher's port later does not feed this worker. At most MAX_TEACHERS. */
static void follow_teachers(worker_t *w, char **endpoints, size_t n, char **keys, size_t n_keys) {
    if (n > MAX_TEACHERS) {
        char what[128];
        snprintf(what, sizeof what, "%zu teacher endpoints; a worker follows the first %d", n,
                 MAX_TEACHERS);
        drop(w, "the coordinator", what);
        n = MAX_TEACHERS;
    }
    char **next = kd_xcalloc(n ? n : 1, sizeof *next);
    int n_next = 0;
    for (size_t i = 0; i < n; i++) {
        const char *ep = endpoints[i];
        size_t len = ep ? strlen(ep) : 0;
        if (len == 0 || len >= ENDPOINT_MAX) {
            drop(w, "the coordinator", "a teacher endpoint that is empty or too long");
            continue;
        }
        if (find_endpoint(next, n_next, ep) >= 0) continue; /* listed twice */
        int known = find_endpoint(w->endpoints, w->n_endpoints, ep);
        if (known >= 0) {
            next[n_next++] = w->endpoints[known];
            w->endpoints[known] = NULL;
            continue;
        }
        char err[KD_ERR_LEN], what[ENDPOINT_MAX + 64];
        if (w->curve_on && (i >= n_keys || !keys[i] ||
                            kd_wire_curve_server_key(w->pull, keys[i], err, sizeof err) != 0)) {
            snprintf(what, sizeof what, "no usable CurveZMQ key for teacher %s", ep);
            drop(w, "the coordinator", what);
            continue;
        }
        if (zmq_connect(w->pull, ep) != 0) {
            snprintf(what, sizeof what, "cannot connect to teacher %s: %s", ep,
                     zmq_strerror(errno));
            drop(w, "the coordinator", what);
            continue;
        }
        next[n_next++] = kd_xstrdup(ep);
        kd_log(KD_LOG_INFO, "WORKER-TEACHER", "pulling batches from %s", ep);
    }
    for (int i = 0; i < w->n_endpoints; i++) {
        if (!w->endpoints[i]) continue;
        if (zmq_disconnect(w->pull, w->endpoints[i]) != 0 && errno != ENOENT)
            kd_log(KD_LOG_WARN, "WORKER-TEACHER-GONE", "cannot disconnect from %s: %s",
                   w->endpoints[i], zmq_strerror(errno));
        else
            kd_log(KD_LOG_INFO, "WORKER-TEACHER-GONE", "teacher %s left: disconnected",
                   w->endpoints[i]);
        free(w->endpoints[i]);
    }
    free(w->endpoints);
    w->endpoints = next;
    w->n_endpoints = n_next;
}

/* The model back on its own buffers (before it is freed, or when weights come by frame). */
static void use_own_buffers(worker_t *w) {
    if (!w->model) return;
    kd_model_set_params(w->model, w->own_params);
    kd_model_set_grads(w->model, w->own_grads);
    w->params_slot = 0;
}

/* Takes the weights of a Welcome or an answer: the shared-memory slot it names, used in place,
 * or its frame, checked and copied into the model. */
static int take_weights(worker_t *w, const kd_msg_t *m, char *err, size_t errlen) {
    const uint32_t slot =
        m->env->body_case == KDIST__ENVELOPE__BODY_WEIGHTS ? m->env->weights->shared_slot : 0;
    if (slot) {
        if (!w->weights_shm.base)
            return kd_err(err, errlen, "weights in shared memory this worker has not mapped");
        uint64_t seq = kd_shm_stable(&w->weights_shm, slot - 1, m->env->weights->version);
        if (!seq)
            return kd_err(err, errlen, "shared-memory slot %u does not hold weights version %llu",
                          slot, (unsigned long long)m->env->weights->version);
        kd_model_set_params(w->model, kd_shm_slot(&w->weights_shm, slot - 1));
        w->params_slot = slot;
        w->params_seq = seq;
        return 0;
    }
    kd_model_set_params(w->model, w->own_params);
    w->params_slot = 0;
    const size_t n = w->model->n_params;
    const kd_dtype_t dtype = kd_wire_format_dtype(w->recipe.cluster.wire);
    const kd_layout_t layout = kd_layout_as(&KD_LAYOUT_WEIGHTS, dtype);
    const void *src = kd_layout_get(m, &layout, (int64_t[]){(int64_t)n}, err, errlen);
    if (!src) return -1;
    kd_wire_unpack_floats(dtype, src, n, w->model->params);
    return 0;
}

/* Maps the segments the coordinator offers; on failure (another machine or pid namespace) the
 * tensors simply go over TCP. */
static void map_shared_memory(worker_t *w, const Kdist__SharedMemory *offer) {
    use_own_buffers(w);
    kd_shm_close(&w->weights_shm);
    kd_shm_close(&w->grad_shm);
    if (!offer) {
        kd_log(KD_LOG_INFO, "WORKER-SHM",
               "tensors go over TCP (the coordinator is on another machine, or "
               "cluster.shared_memory is off), weights and gradients as %s (cluster.wire)",
               kd_wire_format_name(w->recipe.cluster.wire));
        return;
    }
    char err[KD_ERR_LEN];
    const size_t n = w->model->n_params;
    if (kd_shm_open_peer(&w->weights_shm, offer->pid, offer->weights_fd, offer->weight_slots, n,
                         offer->token, false, err, sizeof err) != 0 ||
        kd_shm_open_peer(&w->grad_shm, offer->pid, offer->gradient_fd, 1, n, offer->token, true,
                         err, sizeof err) != 0) {
        kd_shm_close(&w->weights_shm);
        kd_log(KD_LOG_INFO, "WORKER-SHM", "tensors go over TCP, as %s (cluster.wire): %s",
               kd_wire_format_name(w->recipe.cluster.wire), err);
        return;
    }
    kd_log(KD_LOG_INFO, "WORKER-SHM", "weights and gradients go through shared memory");
}

static void free_step_buffers(worker_t *w) {
    free(w->x);
    free(w->y);
    free(w->dlogits);
    free(w->teacher);
    free(w->windows);
    kd_lm_batch_free(&w->lm);
    free(w->lm_records);
    free(w->accumulate_sum);
    free(w->residual);
    free(w->residual_next);
    free(w->topk_scratch);
    free(w->topk_index);
    free(w->topk_values);
    free(w->norm_scratch);
    w->residual = w->residual_next = w->topk_scratch = w->norm_scratch = NULL;
    w->topk_index = NULL;
    w->topk_values = NULL;
    w->topk_k = 0;
    w->lm_records = NULL;
    w->lm_teacher.records = NULL;
    w->x = w->dlogits = w->teacher = w->accumulate_sum = NULL;
    w->y = NULL;
    w->windows = NULL;
    w->batch_cap = 0;
    w->n_held = 0;
}

/* The same for a GPT student: its config (the vocabulary from the Welcome unless the recipe
 * gives one), windows of context + 1, the parameter count and memory for the batches. */
static int check_welcome_sizes_gpt(const kd_recipe_t *r, const Kdist__Welcome *wel,
                                   kd_shape_t shape, char *err, size_t errlen) {
    kd_gpt_config_t cfg = r->student.gpt;
    if (cfg.vocab == 0) cfg.vocab = (int)wel->num_classes;
    char why[KD_ERR_LEN];
    if (kd_gpt_config_check(&cfg, why, sizeof why) != 0)
        return kd_err(err, errlen, "the coordinator's student.gpt: %s", why);
    if (shape.c != 1 || shape.h != 1 || shape.w != cfg.context + 1)
        return kd_err(err, errlen,
                      "the coordinator's windows are %dx%dx%d, its student.gpt.context %d", shape.c,
                      shape.h, shape.w, cfg.context);
    if (wel->n_params != kd_gpt_param_count(&cfg))
        return kd_err(err, errlen, "the coordinator's model has %llu params, its recipe %zu",
                      (unsigned long long)wel->n_params, kd_gpt_param_count(&cfg));
    const long B = r->train.batch_size;
    const double need = kd_model_train_bytes_gpt(&cfg, B) + (double)B * 12.0 * shape.w;
    const uint64_t have = kd_node_memory_bytes();
    if (have && need > (double)have)
        return kd_err(err, errlen,
                      "the coordinator's recipe needs about %.1f GB to train batches of %ld "
                      "windows (student of %llu params), more than this machine's %.1f GB",
                      need / 1e9, B, (unsigned long long)wel->n_params, (double)have / 1e9);
    return 0;
}

/* The sizes a Welcome's recipe implies, bounded before anything is allocated: the student
 * (kd_model_plan) and its parameter count, and what training batches of train.batch_size
 * takes, within this machine's memory. A hostile or mistaken coordinator gets a clear error,
 * never an abort in an allocation. */
static int check_welcome_sizes(const kd_recipe_t *r, const Kdist__Welcome *wel, kd_shape_t shape,
                               char *err, size_t errlen) {
    if (r->student.gpt.layers > 0) return check_welcome_sizes_gpt(r, wel, shape, err, errlen);
    kd_model_t *plan = kd_xmalloc(sizeof *plan);
    int rc = 0;
    char why[KD_ERR_LEN];
    if (kd_model_plan(r->student.layers, r->student.n_layers, shape, plan, why, sizeof why) != 0) {
        rc = kd_err(err, errlen, "the coordinator's student.layers: %s", why);
        goto out;
    }
    if (wel->n_params != plan->n_params) {
        rc = kd_err(err, errlen, "the coordinator's model has %llu params, its recipe %zu",
                    (unsigned long long)wel->n_params, plan->n_params);
        goto out;
    }
    const long B = r->train.batch_size;
    const double step = (double)B * (4.0 * (double)kd_shape_size(shape) + 4.0 +
                                     12.0 * (double)wel->num_classes); /* x, y, dlogits, teacher */
    const double need = kd_model_train_bytes(plan, B) + step;
    const uint64_t have = kd_node_memory_bytes();
    if (have && need > (double)have)
        rc = kd_err(err, errlen,
                    "the coordinator's recipe needs about %.1f GB to train batches of %ld "
                    "(student of %zu params), more than this machine's %.1f GB",
                    need / 1e9, B, plan->n_params, (double)have / 1e9);
out:
    free(plan);
    return rc;
}

/* Builds the student the Welcome describes. Anything that does not match is fatal: this
 * worker cannot compute gradients for that model. */
static int on_welcome(worker_t *w, const kd_msg_t *m) {
    const Kdist__Welcome *wel = m->env->welcome;
    char err[KD_ERR_LEN];
    kd_recipe_t r;
    if (!wel->recipe_yaml || kd_recipe_parse("welcome", wel->recipe_yaml, strlen(wel->recipe_yaml),
                                             NULL, 0, &r, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "WORKER-BAD-WELCOME", "the coordinator's recipe does not load: %s",
               wel->recipe_yaml ? err : "no recipe");
        return FATAL;
    }
    const Kdist__Shape *in = wel->input;
    if (!in || in->c < 1 || in->h < 1 || in->w < 1 || in->c > MAX_INPUT_DIM ||
        in->h > MAX_INPUT_DIM || in->w > MAX_INPUT_DIM ||
        (int64_t)in->c * in->h * in->w > MAX_SAMPLE_SIZE || wel->num_classes < 2 ||
        wel->num_classes > MAX_CLASSES) {
        kd_log(KD_LOG_ERROR, "WORKER-BAD-WELCOME", "input shape or class count out of range");
        return FATAL;
    }
    kd_shape_t shape = {in->c, in->h, in->w};
    if (check_welcome_sizes(&r, wel, shape, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "WORKER-BAD-WELCOME", "%s", err);
        return FATAL;
    }
    kd_log_level_t level;
    if (kd_log_level_parse(r.logging.level, &level) == 0) kd_log_threshold = level;

    /* A model the last gradient may still be read from is not freed under ZeroMQ's feet. */
    wait_grads_released(w);
    use_own_buffers(w);
    kd_model_destroy(&w->model);
    free(w->wire_grads); /* sized for that model */
    w->wire_grads = NULL;
    /* the sample shape and the class count (a GPT's vocabulary) are the Welcome's */
    const kd_dataset_t shape_from = {.channels = shape.c,
                                     .height = shape.h,
                                     .width = shape.w,
                                     .window = (size_t)shape.w,
                                     .num_classes = (int)wel->num_classes};
    if (kd_model_from_recipe(&r, false, &shape_from, &w->model, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "WORKER-MODEL", "%s", err);
        return FATAL;
    }
    w->own_params = w->model->params;
    w->own_grads = w->model->grads;
    w->params_slot = 0;
    char spec[SPEC_MAX];
    kd_model_describe(w->model, spec, sizeof spec);
    if (w->model->num_classes != (int)wel->num_classes ||
        strcmp(spec, wel->model_spec ? wel->model_spec : "") != 0 ||
        w->model->n_params != wel->n_params) {
        kd_log(KD_LOG_ERROR, "WORKER-MODEL",
               "the student built from the recipe (%s, %zu params, %d classes) is not the "
               "coordinator's (%s, %llu params, %u classes)",
               spec, w->model->n_params, w->model->num_classes,
               wel->model_spec ? wel->model_spec : "", (unsigned long long)wel->n_params,
               wel->num_classes);
        return FATAL;
    }
    w->recipe = r; /* its cluster.wire says how the weights come */
    if (take_weights(w, m, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "WORKER-BAD-WELCOME", "weights: %s", err);
        return FATAL;
    }
    map_shared_memory(w, wel->shared_memory);
    w->num_classes = (int)wel->num_classes;
    w->sample_dim = kd_shape_size(shape);
    w->version = wel->weights_version;
    snprintf(w->run_id, sizeof w->run_id, "%s", wel->run_id ? wel->run_id : "");

    free_step_buffers(w);
    w->batch_cap = (size_t)r.train.batch_size;
    const size_t rows = w->batch_cap * (size_t)r.cluster.accumulate;
    if (w->model->gpt) {
        w->windows = kd_xmalloc(rows * w->sample_dim * sizeof *w->windows);
    } else {
        w->x = kd_alloc_floats(rows * w->sample_dim);
        w->y = kd_xmalloc(rows * sizeof *w->y);
        w->dlogits = kd_alloc_floats(w->batch_cap * (size_t)w->num_classes);
    }
    if (r.distill.loss.alpha > 0 && !w->model->gpt)
        w->teacher = kd_alloc_floats(rows * (size_t)w->num_classes);
    if (r.distill.loss.alpha > 0 && w->model->gpt) {
        kd_lm_teacher_format(&r, w->num_classes, &w->lm_teacher);
        w->lm_records = kd_xmalloc(rows * (w->sample_dim - 1) * w->lm_teacher.record_bytes);
    }
    if (r.cluster.accumulate > 1) w->accumulate_sum = kd_alloc_floats(w->model->n_params);
    if (r.cluster.topk_fraction > 0) {
        const size_t n = w->model->n_params;
        w->topk_k = (size_t)ceil((double)r.cluster.topk_fraction * (double)n);
        if (w->topk_k < 1) w->topk_k = 1;
        if (w->topk_k > n) w->topk_k = n;
        w->residual = kd_alloc_floats(n); /* zeroed: nothing held back yet */
        w->residual_next = kd_alloc_floats(n);
        w->topk_scratch = kd_alloc_floats(n);
        w->topk_index = kd_xmalloc(w->topk_k * sizeof *w->topk_index);
        w->topk_values = kd_xmalloc(w->topk_k * sizeof(float));
    }
    kd_set_threads(w->threads > 0 ? w->threads : (int)r.train.threads);

    if (!w->pull) {
        w->pull = zmq_socket(w->ctx, ZMQ_PULL);
        if (!w->pull) {
            kd_log(KD_LOG_ERROR, "WORKER-SOCKET", "cannot create socket: %s", zmq_strerror(errno));
            return FATAL;
        }
        int zero = 0;
        int64_t max = KD_WIRE_MAX_MESSAGE;
        zmq_setsockopt(w->pull, ZMQ_LINGER, &zero, sizeof zero);
        zmq_setsockopt(w->pull, ZMQ_MAXMSGSIZE, &max, sizeof max);
        kd_curve_client_t self = {.self = w->curve.self}; /* server keys: one per connect */
        if ((w->curve_on && kd_wire_curve_client(w->pull, &self, err, sizeof err) != 0) ||
            kd_curve_watch_start(&w->pull_watch, w->ctx, w->pull, "pull", err, sizeof err) != 0) {
            kd_log(KD_LOG_ERROR, "WORKER-SOCKET", "batch socket: %s", err);
            return FATAL;
        }
    }
    /* Applies to the connections made from now on. */
    int hwm = (int)r.cluster.stream_hwm;
    zmq_setsockopt(w->pull, ZMQ_RCVHWM, &hwm, sizeof hwm);
    follow_teachers(w, wel->teacher_endpoints, wel->n_teacher_endpoints, wel->teacher_keys,
                    wel->n_teacher_keys);

    kd_session_set_timing(
        w->session, wel->heartbeat_ms > 0 ? (int)wel->heartbeat_ms : (int)r.cluster.heartbeat_ms,
        (int)r.cluster.heartbeat_timeout_ms);
    w->state = ST_IDLE;
    w->idle_since = kd_now();
    w->waiting_announced = false;
    w->wait_weights = w->push_seconds = 0;
    kd_log(KD_LOG_INFO, "WORKER-WELCOME",
           "joined run %s: %s, %zu params, weights version %llu, %d teacher(s), batch %ld",
           w->run_id, spec, w->model->n_params, (unsigned long long)w->version, w->n_endpoints,
           r.train.batch_size);
    return KEEP_GOING;
}

/* ---- a training step --------------------------------------------------------------------- */

/* First row of held batch j in the step buffers. */
static size_t held_row(const worker_t *w, int j) {
    return (size_t)j * w->batch_cap;
}

/* A language model's teacher records of held batch j. */
static uint8_t *held_records(const worker_t *w, int j) {
    return w->lm_records + held_row(w, j) * (w->sample_dim - 1) * w->lm_teacher.record_bytes;
}

/* The batch just taken, as the next held one. */
static void hold(worker_t *w, const Kdist__BatchRef *ref, int64_t B) {
    w->held[w->n_held].epoch = ref->epoch;
    w->held[w->n_held].batch_id = ref->batch_id;
    w->held[w->n_held].B = (int)B;
}

/* A language model's batch: a "tokens" tensor of windows, every id inside the vocabulary, and
 * when distilling the teacher's records of their positions, every one of them valid. */
static int take_windows(worker_t *w, const kd_msg_t *m, Kdist__NackReason *nack, char *err,
                        size_t errlen) {
    const bool distil = w->lm_records != NULL;
    *nack = distil && m->n_tensors == 1 ? KDIST__NACK_REASON__NACK_TEACHER_LOGITS
                                        : KDIST__NACK_REASON__NACK_INPUTS;
    if (m->n_tensors != (distil ? 2 : 1))
        return kd_err(err, errlen, "batch with %d tensors, expected the token windows%s",
                      m->n_tensors,
                      distil ? " and the teacher's records (distill.alpha > 0)" : " alone");
    const int64_t shape[2] = {-1, (int64_t)w->sample_dim};
    const int32_t *ids = kd_layout_get(m, &KD_LAYOUT_TOKENS, shape, err, errlen);
    if (!ids) return -1;
    const int64_t B = m->env->tensors[0]->shape[0];
    if (B < 1 || B > (int64_t)w->batch_cap)
        return kd_err(err, errlen, "batch of %lld windows (1..%zu allowed)", (long long)B,
                      w->batch_cap);
    const size_t n = (size_t)B * w->sample_dim;
    uint32_t *windows = w->windows + held_row(w, w->n_held) * w->sample_dim;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= w->num_classes)
            return kd_err(err, errlen,
                          "token id %d at %zu of window %zu is outside the "
                          "vocabulary [0, %d)",
                          ids[i], i % w->sample_dim, i / w->sample_dim, w->num_classes);
        windows[i] = (uint32_t)ids[i];
    }
    if (distil) {
        *nack = KDIST__NACK_REASON__NACK_TEACHER_LOGITS;
        const int64_t T = (int64_t)w->sample_dim - 1;
        const int64_t rshape[3] = {B, T, (int64_t)w->lm_teacher.record_bytes};
        const uint8_t *rec = kd_layout_get(m, &KD_LAYOUT_TEACHER_RECORDS, rshape, err, errlen);
        if (!rec) return -1;
        uint8_t *records = held_records(w, w->n_held);
        memcpy(records, rec, (size_t)B * (size_t)T * w->lm_teacher.record_bytes);
        w->lm_teacher.records = records;
        if (kd_lm_teacher_check(&w->lm_teacher, (int)B, (int)T, &w->lm, err, errlen) != 0)
            return -1;
    }
    *nack = KDIST__NACK_REASON__NACK_UNSPECIFIED;
    hold(w, m->env->batch->ref, B);
    return 0;
}

/* Checks a Batch and copies it into the step buffers. Returns 0, or -1 with err set and
 * *nack saying why the batch cannot be used (NACK_UNSPECIFIED when the message names no batch
 * to nack). */
static int take_batch(worker_t *w, const kd_msg_t *m, Kdist__NackReason *nack, char *err,
                      size_t errlen) {
    *nack = KDIST__NACK_REASON__NACK_UNSPECIFIED;
    if (m->env->body_case != KDIST__ENVELOPE__BODY_BATCH)
        return kd_err(err, errlen, "a %s message on the batch stream", kd_wire_body_name(m->env));
    const Kdist__Batch *b = m->env->batch;
    if (!b->ref) return kd_err(err, errlen, "batch without a reference");
    *nack = KDIST__NACK_REASON__NACK_OTHER;
    if (b->ref->epoch >= (uint32_t)w->recipe.train.epochs)
        return kd_err(err, errlen, "batch of epoch %u, the run has %ld", b->ref->epoch,
                      w->recipe.train.epochs);
    if (w->model->gpt) return take_windows(w, m, nack, err, errlen);
    const int want = w->teacher ? 3 : 2;
    *nack = m->n_tensors == 2 && want == 3 ? KDIST__NACK_REASON__NACK_TEACHER_LOGITS
                                           : KDIST__NACK_REASON__NACK_INPUTS;
    if (m->n_tensors != want)
        return kd_err(err, errlen, "batch with %d tensors, expected inputs, labels%s", m->n_tensors,
                      w->teacher ? " and teacher logits (distill.alpha > 0)" : "");
    const kd_shape_t in = w->model->input;
    const int64_t in_shape[4] = {-1, in.c, in.h, in.w};
    const uint8_t *pixels = kd_layout_get(m, &KD_LAYOUT_INPUTS, in_shape, err, errlen);
    if (!pixels) return -1;
    const int64_t B = m->env->tensors[0]->shape[0];
    if (B < 1 || B > (int64_t)w->batch_cap)
        return kd_err(err, errlen, "batch of %lld samples (1..%zu allowed)", (long long)B,
                      w->batch_cap);
    *nack = KDIST__NACK_REASON__NACK_LABELS;
    const int64_t label_shape[1] = {B};
    const int32_t *labels = kd_layout_get(m, &KD_LAYOUT_LABELS, label_shape, err, errlen);
    if (!labels) return -1;
    for (int64_t i = 0; i < B; i++)
        if (labels[i] < 0 || labels[i] >= w->num_classes)
            return kd_err(err, errlen, "label %d of sample %lld out of range [0, %d)", labels[i],
                          (long long)i, w->num_classes);
    *nack = KDIST__NACK_REASON__NACK_TEACHER_LOGITS;
    if (w->teacher) {
        const int64_t logit_shape[2] = {B, w->num_classes};
        const float *logits = kd_layout_get(m, &KD_LAYOUT_TEACHER_LOGITS, logit_shape, err, errlen);
        if (!logits) return -1;
        const size_t n_logits = (size_t)B * (size_t)w->num_classes;
        for (size_t i = 0; i < n_logits; i++)
            if (!isfinite(logits[i]))
                return kd_err(err, errlen, "teacher logit %zu of the batch is not finite", i);
        memcpy(w->teacher + held_row(w, w->n_held) * (size_t)w->num_classes, logits,
               n_logits * sizeof *logits);
    }
    *nack = KDIST__NACK_REASON__NACK_UNSPECIFIED;
    const size_t row = held_row(w, w->n_held);
    kd_pixels_to_float(pixels, (size_t)B * w->sample_dim, w->x + row * w->sample_dim);
    memcpy(w->y + row, labels, (size_t)B * sizeof *labels);
    hold(w, b->ref, B);
    return 0;
}

/* Gradient of held batch j on the current weights: in model->grads, and with
 * cluster.accumulate > 1 added into grad_sum. False if the weights under it changed (the
 * connection is then lost). */
static bool compute_gradient(worker_t *w, int j) {
    kd_model_t *m = w->model;
    const bool shared = w->grad_shm.base != NULL;
    const bool summing = w->recipe.cluster.accumulate > 1;
    if (j == 0) {
        wait_grads_released(w);
        memcpy(w->fwd_before, m->forward_seconds, sizeof w->fwd_before);
        memcpy(w->bwd_before, m->backward_seconds, sizeof w->bwd_before);
        memset(&w->stats, 0, sizeof w->stats);
        w->held_samples = 0;
        /* the push's gradient: written in place in the segment's slot, or the own buffers */
        float *out = shared ? kd_shm_slot(&w->grad_shm, 0) : NULL;
        if (shared) kd_shm_begin_write(&w->grad_shm, 0);
        w->grad_sum = summing ? (out ? out : w->accumulate_sum) : NULL;
        kd_model_set_grads(m, out && !summing ? out : w->own_grads);
    }
    const int B = w->held[j].B;
    const size_t row = held_row(w, j);
    const uint64_t key =
        kd_batch_key((uint64_t)w->recipe.seed, w->held[j].epoch, w->held[j].batch_id);
    if (m->gpt) {
        if (w->lm_records) w->lm_teacher.records = held_records(w, j);
        kd_train_gradient_lm(m, w->windows + row * w->sample_dim, B, key, &w->recipe.distill.loss,
                             w->lm_records ? &w->lm_teacher : NULL, &w->lm, &w->stats);
    } else {
        kd_train_gradient(m, &w->recipe.distill.loss, w->x + row * w->sample_dim, w->y + row,
                          w->teacher ? w->teacher + row * (size_t)w->num_classes : NULL, B, key,
                          w->dlogits, &w->stats);
    }
    if (w->params_slot && !kd_shm_unchanged(&w->weights_shm, w->params_slot - 1, w->params_seq)) {
        /* the coordinator reused the slot under us: this gradient is worthless */
        lose_coordinator(w, "the shared-memory weights changed during the step");
        return false;
    }
    if (summing) kd_grad_accumulate(w->grad_sum, m->grads, m->n_params, B, j == 0);
    w->held_samples += B;
    return true;
}

/* The push's gradient in full, in the cluster.wire dtype: sent from where it is (fp32) or from
 * wire_grads, zero-copy until ZeroMQ lets go (release_grads). */
static void pack_dense(worker_t *w, const float *grads, kd_wire_tensor_t *t) {
    const size_t n = w->model->n_params;
    const kd_dtype_t dtype = kd_wire_format_dtype(w->recipe.cluster.wire);
    const kd_layout_t layout = kd_layout_as(&KD_LAYOUT_GRADIENT, dtype);
    *t = kd_layout_tensor(&layout, (int64_t[]){(int64_t)n});
    t->data = grads;
    t->nbytes = n * kd_dtype_size(dtype);
    if (dtype != KD_DTYPE_F32) { /* 16 bits: packed here, sent from here */
        if (!w->wire_grads) w->wire_grads = kd_xmalloc(t->nbytes);
        kd_wire_pack_floats(dtype, grads, n, w->wire_grads);
        t->data = w->wire_grads;
    }
    t->free_fn = release_grads;
    t->hint = &w->grads_in_flight;
}

/* Values per GradientChunk (cluster.overlap): 128 KB of fp32, 1 ms at 1 Gbit/s, so the first
 * weights come back while most of the gradient is still going up. */
#define PUSH_CHUNK_VALUES ((size_t)1 << 15)

/* The L2 norm of gradient t as the coordinator computes it: of the fp32 values it unpacks. */
static float wire_gradient_norm(worker_t *w, const kd_wire_tensor_t *t) {
    const size_t n = w->model->n_params;
    if (t->dtype == KD_DTYPE_F32) return kd_l2_norm(t->data, n);
    if (!w->norm_scratch) w->norm_scratch = kd_xmalloc(n * sizeof(float));
    kd_wire_unpack_floats(t->dtype, t->data, n, w->norm_scratch);
    return kd_l2_norm(w->norm_scratch, n);
}

/* Sends the push header, then (cluster.overlap) its dense gradient t in chunks, each zero-copy
 * from t's buffer. -1 if the pipe is gone. */
static int send_push(worker_t *w, kd_env_t *env, kd_wire_tensor_t *tensors, int n_tensors) {
    Kdist__PushGradient *push = env->push;
    const bool chunked = w->recipe.cluster.overlap && n_tensors == 1 && !w->topk_k;
    if (!chunked) {
        if (n_tensors == 1 && tensors[0].free_fn) atomic_fetch_add(&w->grads_in_flight, 1);
        return kd_session_send(w->session, env, tensors, n_tensors, NULL, 0);
    }
    const size_t n = w->model->n_params, size = tensors[0].nbytes / n;
    push->chunks = (uint32_t)((n + PUSH_CHUNK_VALUES - 1) / PUSH_CHUNK_VALUES);
    if (w->recipe.optim.cfg.clip_norm > 0) /* the coordinator clips chunks by it */
        push->gradient_norm = wire_gradient_norm(w, &tensors[0]);
    if (kd_session_send(w->session, env, NULL, 0, NULL, 0) != 0) return -1;
    Kdist__GradientChunk gc = KDIST__GRADIENT_CHUNK__INIT;
    gc.clock = push->clock;
    kd_env_t chunk_env = KDIST__ENVELOPE__INIT;
    chunk_env.body_case = KDIST__ENVELOPE__BODY_GRADIENT_CHUNK;
    chunk_env.gradient_chunk = &gc;
    for (size_t lo = 0; lo < n; lo += PUSH_CHUNK_VALUES) {
        const size_t len = n - lo < PUSH_CHUNK_VALUES ? n - lo : PUSH_CHUNK_VALUES;
        kd_wire_tensor_t t = tensors[0];
        t.shape[0] = (int64_t)len;
        t.data = (const uint8_t *)tensors[0].data + lo * size;
        t.nbytes = len * size;
        gc.offset = lo;
        atomic_fetch_add(&w->grads_in_flight, 1);
        if (kd_session_send(w->session, &chunk_env, &t, 1, NULL, 0) != 0) return -1;
    }
    return 0;
}

/* cluster.topk_fraction: the largest values of residual + gradient as (index, value) pairs,
 * copied into the message (they are small); the rest waits in residual_next. */
static void pack_topk(worker_t *w, const float *grads, kd_wire_tensor_t t[2]) {
    const size_t n = w->model->n_params, k = w->topk_k;
    const kd_dtype_t dtype = kd_wire_format_dtype(w->recipe.cluster.wire);
    for (size_t i = 0; i < n; i++) w->residual_next[i] = w->residual[i] + grads[i];
    kd_wire_pack_topk(dtype, w->residual_next, n, k, w->topk_index, w->topk_values,
                      w->topk_scratch);
    const kd_layout_t values = kd_layout_as(&KD_LAYOUT_GRADIENT_VALUES, dtype);
    t[0] = kd_layout_tensor(&KD_LAYOUT_GRADIENT_INDEX, (int64_t[]){(int64_t)k});
    t[0].data = w->topk_index;
    t[0].nbytes = k * sizeof *w->topk_index;
    t[1] = kd_layout_tensor(&values, (int64_t[]){(int64_t)k});
    t[1].data = w->topk_values;
    t[1].nbytes = k * kd_dtype_size(dtype);
    w->topk_pending = true;
}

/* The answer applied the last push: what it did not carry is the residual from now on. */
static void topk_applied(worker_t *w) {
    if (!w->topk_pending) return;
    float *t = w->residual;
    w->residual = w->residual_next;
    w->residual_next = t;
    w->topk_pending = false;
}

/* The gradient of the held batches, computed on the current weights, pushed to the
 * coordinator as one. first: the first held batch still needs its gradient (a redo: all do).
 * wait_batch and t_start: the first phase, and when computing started. */
static int compute_and_push(worker_t *w, int first, double wait_batch, double t_start) {
    kd_model_t *m = w->model;
    for (int j = first; j < w->n_held; j++)
        if (!compute_gradient(w, j)) return KEEP_GOING;
    for (int l = 0; l < m->n_layers; l++) {
        w->fwd[l] = m->forward_seconds[l] - w->fwd_before[l];
        w->bwd[l] = m->backward_seconds[l] - w->bwd_before[l];
    }
    const double t_computed = kd_now();
    const bool shared = w->grad_shm.base != NULL;
    const float *grads = m->grads;
    if (w->grad_sum) {
        kd_grad_mean(w->grad_sum, m->n_params, w->held_samples);
        grads = w->grad_sum;
    }

    /* A push cannot carry its own send time: like wait-weights, the push phase is the
     * previous step's. */
    double phases[4] = {w->held_wait + wait_batch, w->held_compute + t_computed - t_start,
                        w->push_seconds, w->wait_weights};
    Kdist__BatchRef refs[KD_MAX_ACCUMULATE], *more[KD_MAX_ACCUMULATE];
    for (int j = 0; j < w->n_held; j++) {
        kdist__batch_ref__init(&refs[j]);
        refs[j].epoch = w->held[j].epoch;
        refs[j].batch_id = w->held[j].batch_id;
        more[j] = &refs[j];
    }
    Kdist__PushGradient push = KDIST__PUSH_GRADIENT__INIT;
    push.ref = &refs[0];
    push.n_accumulated = (size_t)w->n_held - 1;
    push.accumulated = more + 1;
    push.base_version = w->version;
    push.clock = ++w->clock;
    push.samples = (uint32_t)w->held_samples;
    push.loss_sum = w->stats.loss_sum;
    push.correct = (uint32_t)w->stats.correct;
    push.tokens = m->gpt ? (uint64_t)w->stats.count : 0;
    push.n_phase_seconds = 4;
    push.phase_seconds = phases;
    push.n_layer_forward_seconds = push.n_layer_backward_seconds = (size_t)m->n_layers;
    push.layer_forward_seconds = w->fwd;
    push.layer_backward_seconds = w->bwd;
    push.rss_bytes = kd_node_rss_bytes();
    kd_wire_tensor_t tensors[2];
    const int n_tensors = shared ? 0 : w->topk_k ? 2 : 1;
    if (n_tensors == 2)
        pack_topk(w, grads, tensors);
    else if (n_tensors == 1)
        pack_dense(w, grads, &tensors[0]);
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_PUSH;
    env.push = &push;
    push.shared_memory = shared;
    if (shared) kd_shm_end_write(&w->grad_shm, 0, push.clock);
    w->held_wait = w->held_compute = 0;
    w->wchunk_next = 0;
    if (send_push(w, &env, tensors, n_tensors) != 0) {
        /* Nowhere to send (the pipe is gone): the reconnect path streams the batches again. */
        lose_coordinator(w, "cannot push the gradient");
        return KEEP_GOING;
    }
    w->push_done = kd_now();
    w->push_seconds = w->push_done - t_computed;
    w->state = ST_WAIT_WEIGHTS;
    w->told_to_wait = false;
    w->steps++;
    w->samples += (uint64_t)w->held_samples;
    w->report_samples += (double)w->held_samples;
    return KEEP_GOING;
}

/* Progress line, at most every 10 s. */
static void report(worker_t *w) {
    double now = kd_now();
    if (now - w->report_t < 10.0) return;
    if (w->report_t > 0)
        kd_log(KD_LOG_INFO, "WORKER-PROGRESS",
               "%llu steps, %.0f samples/s, last loss %.4f, weights version %llu",
               (unsigned long long)w->steps, w->report_samples / (now - w->report_t),
               w->stats.count ? w->stats.loss_sum / w->stats.count : 0.0,
               (unsigned long long)w->version);
    w->report_t = now;
    w->report_samples = 0;
}

/* The answer to a push (or, when idle, a stop or fresh weights). */
static int on_weights(worker_t *w, const kd_msg_t *m) {
    const Kdist__Weights *wt = m->env->weights;
    char err[KD_ERR_LEN];
    if (wt->stop) {
        kd_log(KD_LOG_INFO, "WORKER-STOP", "the coordinator says stop");
        return STOP_NOW;
    }
    if (w->state != ST_WAIT_WEIGHTS) {
        /* Not an answer: fresh weights for an idle worker are welcome, nothing else is. */
        if ((m->n_tensors == 1 || wt->shared_slot) && take_weights(w, m, err, sizeof err) == 0)
            w->version = wt->version;
        else
            drop(w, "the coordinator", "weights while no push was pending");
        return KEEP_GOING;
    }
    if (wt->wait) {
        /* SSP: too far ahead; the weights follow when the slowest catch up. */
        w->told_to_wait = true;
        return kd_node_stop_requested ? STOP_NOW : KEEP_GOING;
    }
    if (wt->streamed &&
        (w->wchunk_next != w->model->n_params || w->wchunk_version != wt->version)) {
        /* own_params hold part of a version: only a fresh Welcome's weights are whole again */
        lose_coordinator(w, "the weights chunks of the answer did not all come");
        return KEEP_GOING;
    }
    bool has = m->n_tensors > 0 || wt->shared_slot > 0 || wt->streamed;
    if (has && !wt->streamed && take_weights(w, m, err, sizeof err) != 0) {
        if (wt->shared_slot) { /* the coordinator reused a slot it pointed us to: start over */
            lose_coordinator(w, err);
            return KEEP_GOING;
        }
        drop(w, "the coordinator", err);
        return KEEP_GOING;
    }
    if ((!has && (wt->redo || !wt->duplicate)) || (wt->redo && w->n_held == 0)) {
        drop(w, "the coordinator", "an answer without the weights it needs");
        return KEEP_GOING;
    }
    const double now = kd_now();
    w->wait_weights = now - w->push_done;
    if (has) w->version = wt->version;
    if (kd_node_stop_requested) return STOP_NOW;
    if (has) w->batches_left = wt->batches_left;
    if (wt->redo || wt->duplicate)
        w->topk_pending = false; /* not applied: the residual stays as it was */
    else
        topk_applied(w);
    if (wt->redo && w->n_held > 0) {
        /* Sync: too late for its step; the same batches again on the new weights. */
        return compute_and_push(w, 0, 0.0, now);
    }
    w->n_held = 0;
    w->state = ST_IDLE;
    w->idle_since = now;
    w->waiting_announced = false;
    report(w);
    return KEEP_GOING;
}

/* A range of the next version's weights (cluster.overlap), written in place: the push is
 * answered, the old weights are no longer needed; an answer other than REPLY_STREAMED brings
 * all of them again. */
static void on_weights_chunk(worker_t *w, const kd_msg_t *m) {
    const Kdist__WeightsChunk *wc = m->env->weights_chunk;
    const size_t n = w->model->n_params;
    const kd_dtype_t dtype = kd_wire_format_dtype(w->recipe.cluster.wire);
    const kd_layout_t layout = kd_layout_as(&KD_LAYOUT_WEIGHTS, dtype);
    char err[KD_ERR_LEN];
    const void *src = kd_layout_get(m, &layout, (int64_t[]){-1}, err, sizeof err);
    if (!src) {
        drop(w, "the coordinator", err);
        return;
    }
    const size_t len = (size_t)m->env->tensors[0]->shape[0];
    if (w->state != ST_WAIT_WEIGHTS || w->params_slot || wc->offset != w->wchunk_next ||
        len > n - w->wchunk_next || wc->version <= w->version ||
        (w->wchunk_next && wc->version != w->wchunk_version)) {
        drop(w, "the coordinator", "a weights chunk out of turn");
        return;
    }
    kd_wire_unpack_floats(dtype, src, len, w->own_params + w->wchunk_next);
    w->wchunk_version = wc->version;
    w->wchunk_next += len;
}

/* A message of the session's (Welcome or any other the session leaves to the worker). */
static int on_coordinator_message(worker_t *w, const kd_msg_t *m) {
    kd_env_t *env = m->env;
    switch (env->body_case) {
    case KDIST__ENVELOPE__BODY_WELCOME: /* the first of this connection: kd_session_recv */
        return on_welcome(w, m);
    case KDIST__ENVELOPE__BODY_WEIGHTS:
        if (w->state == ST_HELLO)
            return drop(w, "the coordinator", "weights before welcome"), KEEP_GOING;
        return on_weights(w, m);
    case KDIST__ENVELOPE__BODY_WEIGHTS_CHUNK:
        if (w->state == ST_HELLO)
            return drop(w, "the coordinator", "weights before welcome"), KEEP_GOING;
        on_weights_chunk(w, m);
        return KEEP_GOING;
    case KDIST__ENVELOPE__BODY_PEERS:
        if (w->state == ST_HELLO)
            return drop(w, "the coordinator", "peers before welcome"), KEEP_GOING;
        follow_teachers(w, env->peers->teacher_endpoints, env->peers->n_teacher_endpoints,
                        env->peers->teacher_keys, env->peers->n_teacher_keys);
        return KEEP_GOING;
    case KDIST__ENVELOPE__BODY_CONTROL:
        if (env->control->kind == KDIST__CONTROL__KIND__STOP) {
            /* Not in the protocol for workers, but its meaning is plain: stop like SIGTERM. */
            kd_node_stop_requested = 1;
            return KEEP_GOING;
        }
        drop(w, "the coordinator", "a control message other than stop");
        return KEEP_GOING;
    default: {
        char what[64];
        snprintf(what, sizeof what, "unexpected %s message", kd_wire_body_name(env));
        drop(w, "the coordinator", what);
        return KEEP_GOING;
    }
    }
}

/* What the session reports, other than a message. The session logged what was fatal. */
static int on_session_event(void *node, kd_session_event_t ev, const char *err) {
    worker_t *w = node;
    if (ev == KD_SESSION_BAD) drop(w, "the coordinator", err);
    if (ev == KD_SESSION_HELLO || ev == KD_SESSION_LOST) { /* a new incarnation: clock anew */
        w->state = ST_HELLO;
        w->clock = 0;
        w->n_held = 0; /* the coordinator streams them again */
        w->topk_pending = false;
    }
    return KEEP_GOING;
}

static int on_message_for_worker(void *node, kd_msg_t *m) {
    return on_coordinator_message(node, m);
}

static const kd_session_handlers_t session_handlers = {on_message_for_worker, on_session_event};

static int drain_dealer(worker_t *w) {
    return kd_session_pump(w->session, &session_handlers, w);
}

/* Tells the coordinator that the batch of m cannot be used (it is not trained on), so that it
 * has it recomputed or reassigned instead of waiting for a gradient that never comes. */
static void send_nack(worker_t *w, const kd_msg_t *m, Kdist__NackReason reason,
                      const char *detail) {
    Kdist__BatchRef ref = KDIST__BATCH_REF__INIT;
    ref.epoch = m->env->batch->ref->epoch;
    ref.batch_id = m->env->batch->ref->batch_id;
    Kdist__Nack nack = KDIST__NACK__INIT;
    nack.ref = &ref;
    nack.reason = reason;
    nack.detail = (char *)detail;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_NACK;
    env.nack = &nack;
    kd_session_send(w->session, &env, NULL, 0, NULL, 0);
    w->nacks++;
}

/* Whether the held batches are all one push takes: cluster.accumulate of them, or all the
 * coordinator said were left of the epoch. */
static bool held_enough(const worker_t *w) {
    return w->n_held >= w->recipe.cluster.accumulate ||
           (w->batches_left > 0 && (uint64_t)w->n_held >= w->batches_left);
}

/* A batch of another epoch than the held ones: the coordinator moved on, so those were all
 * applied (an epoch ends only then) and are dropped. A copy of a held batch (streamed again)
 * is dropped itself: true. */
static bool held_already(worker_t *w, const kd_msg_t *m) {
    if (w->n_held == 0 || m->env->body_case != KDIST__ENVELOPE__BODY_BATCH || !m->env->batch->ref)
        return false;
    const Kdist__BatchRef *ref = m->env->batch->ref;
    if (ref->epoch != w->held[0].epoch) {
        kd_log(KD_LOG_INFO, "WORKER-HELD-DROPPED",
               "batch of epoch %u while holding %d of epoch %u: those are already applied",
               ref->epoch, w->n_held, w->held[0].epoch);
        w->n_held = 0;
        return false;
    }
    for (int j = 0; j < w->n_held; j++)
        if (w->held[j].batch_id == ref->batch_id) return true;
    return false;
}

/* One batch off the PULL socket, if one is there: checked, then trained on; one that cannot be
 * used is nacked. Pushed once enough are held (held_enough). */
static int pull_batch(worker_t *w) {
    kd_msg_t m;
    char err[KD_ERR_LEN];
    int rc = kd_wire_recv(w->pull, false, ZMQ_DONTWAIT, &m, err, sizeof err);
    if (rc == KD_WIRE_NONE) return KEEP_GOING;
    if (rc == KD_WIRE_CLOSED) {
        kd_log(KD_LOG_ERROR, "WORKER-SOCKET", "batch socket: %s", err);
        return FATAL;
    }
    const double t_start = kd_now();
    Kdist__NackReason nack = KDIST__NACK_REASON__NACK_UNSPECIFIED;
    if (rc == KD_WIRE_OK && held_already(w, &m)) {
        kd_msg_close(&m);
        return KEEP_GOING;
    }
    if (rc == KD_WIRE_BAD || take_batch(w, &m, &nack, err, sizeof err) != 0) {
        drop(w, "a teacher", err);
        if (nack != KDIST__NACK_REASON__NACK_UNSPECIFIED) send_nack(w, &m, nack, err);
        if (rc == KD_WIRE_OK) kd_msg_close(&m);
        return KEEP_GOING;
    }
    kd_msg_close(&m);
    const double wait_batch = t_start - w->idle_since;
    if (!compute_gradient(w, w->n_held)) return KEEP_GOING;
    w->n_held++;
    if (held_enough(w)) return compute_and_push(w, w->n_held, wait_batch, t_start);
    /* more to gather: idle again, this batch's phases kept for the push */
    const double now = kd_now();
    w->held_wait += wait_batch;
    w->held_compute += now - t_start;
    w->held_since = w->idle_since = now;
    return KEEP_GOING;
}

/* ---- main loop --------------------------------------------------------------------------- */

/* A push the coordinator dropped is never answered; past this the worker starts over (a new
 * incarnation) instead of waiting forever. Long enough for a sync step to close without a dead
 * worker (the coordinator removes it after heartbeat_timeout_ms). */
static double answer_timeout(const worker_t *w) {
    return 2.0 * w->recipe.cluster.heartbeat_timeout_ms / 1000.0;
}

/* How long a worker holding fewer than cluster.accumulate batches waits for the next. */
static double accumulate_wait(const worker_t *w) {
    return w->recipe.cluster.accumulate_wait_ms / 1000.0;
}

static int poll_timeout_ms(const worker_t *w, double now) {
    double next = now + 1.0;
    double session = kd_session_deadline(w->session);
    if (session < next) next = session;
    if (connected(w)) {
        if (w->state == ST_IDLE && !w->waiting_announced && w->idle_since + WAITING_AFTER < next)
            next = w->idle_since + WAITING_AFTER;
        if (w->state == ST_IDLE && w->n_held > 0 && w->held_since + accumulate_wait(w) < next)
            next = w->held_since + accumulate_wait(w);
        if (w->state == ST_WAIT_WEIGHTS && !w->told_to_wait &&
            w->push_done + answer_timeout(w) < next)
            next = w->push_done + answer_timeout(w);
    }
    double ms = (next - now) * 1000.0 + 1.0;
    return ms < 0 ? 0 : ms > 1000 ? 1000 : (int)ms;
}

/* A teacher that refuses us is logged (this worker still gets batches from the others); the
 * coordinator's handshakes are the session's. */
static void check_stream_handshakes(worker_t *w) {
    char why[KD_ERR_LEN];
    int verdict = kd_curve_watch_check(&w->pull_watch, "a teacher node",
                                       w->curve_on ? &w->curve : NULL, why, sizeof why);
    if ((verdict == KD_CURVE_REFUSED || verdict == KD_CURVE_MISMATCH) &&
        kd_log_allow(&w->stream_limit, 1.0))
        kd_log(KD_LOG_ERROR, "WORKER-CURVE", "batch stream: %s", why);
}

static int run(worker_t *w) {
    char err[KD_ERR_LEN];
    for (;;) {
        /* A step in progress finishes first: its answer is awaited in ST_WAIT_WEIGHTS; held
         * batches are pushed first. */
        const bool push_held = w->state == ST_IDLE && w->n_held > 0 && connected(w);
        if (kd_node_stop_requested && !push_held && (w->state != ST_WAIT_WEIGHTS || !connected(w)))
            return STOP_NOW;
        /* What arrived during a long step counts before the silence check. */
        int action = drain_dealer(w);
        if (action != KEEP_GOING) return action;
        double now = kd_now();
        action = kd_session_answer(&session_handlers, w,
                                   kd_session_tick(w->session, now, err, sizeof err), err);
        if (action != KEEP_GOING) return action;
        check_stream_handshakes(w);
        if (!connected(w)) {
            zmq_poll(NULL, 0, poll_timeout_ms(w, now));
            continue;
        }
        if (w->state == ST_WAIT_WEIGHTS && !w->told_to_wait &&
            now - w->push_done > answer_timeout(w)) {
            char why[128];
            snprintf(why, sizeof why, "no answer to the push of batch %u/%u in %.0f s",
                     w->held[0].epoch, w->held[0].batch_id, answer_timeout(w));
            lose_coordinator(w, why);
            continue;
        }
        if (push_held && (kd_node_stop_requested || now - w->held_since >= accumulate_wait(w))) {
            /* fewer than cluster.accumulate, and the next is not coming soon: push these */
            action = compute_and_push(w, w->n_held, 0.0, now);
            if (action != KEEP_GOING) return action;
            continue;
        }
        if (w->state == ST_IDLE && !w->waiting_announced && now - w->idle_since > WAITING_AFTER) {
            send_heartbeat(w, true);
            w->waiting_announced = true;
        } else if (kd_session_heartbeat_due(w->session, now)) {
            send_heartbeat(w, w->state == ST_IDLE && w->waiting_announced);
        }

        zmq_pollitem_t items[2] = {{.socket = kd_session_socket(w->session), .events = ZMQ_POLLIN},
                                   {.socket = w->pull, .events = ZMQ_POLLIN}};
        int n = w->state == ST_IDLE ? 2 : 1;
        int rc = zmq_poll(items, n, poll_timeout_ms(w, now));
        if (rc < 0) {
            if (errno == EINTR) continue;
            kd_log(KD_LOG_ERROR, "WORKER-POLL", "zmq_poll: %s", zmq_strerror(errno));
            return FATAL;
        }
        /* Control first: a stop or new membership must not wait behind a step. */
        if (items[0].revents & ZMQ_POLLIN) {
            action = drain_dealer(w);
            if (action != KEEP_GOING) return action;
        }
        if (n == 2 && w->state == ST_IDLE && connected(w) && !kd_node_stop_requested &&
            (items[1].revents & ZMQ_POLLIN)) {
            action = pull_batch(w);
            if (action != KEEP_GOING) return action;
        }
    }
}

static int parse_args(worker_t *w, int argc, char **argv) {
    const char *id = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(0);
        }
        bool takes_value = strcmp(a, "--coordinator") == 0 || strcmp(a, "--id") == 0 ||
                           strcmp(a, "--threads") == 0 || strcmp(a, "--log") == 0 ||
                           strcmp(a, "--key") == 0 || strcmp(a, "--coordinator-key") == 0;
        if (!takes_value) {
            fprintf(stderr, "kdist-worker: unknown argument '%s'\n", a);
            usage(stderr);
            return -1;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "kdist-worker: %s needs a value\n", a);
            return -1;
        }
        const char *v = argv[++i];
        if (strcmp(a, "--coordinator") == 0)
            w->coordinator = v;
        else if (strcmp(a, "--id") == 0)
            id = v;
        else if (strcmp(a, "--log") == 0)
            w->log_path = v;
        else if (strcmp(a, "--key") == 0)
            w->key_opt = v;
        else if (strcmp(a, "--coordinator-key") == 0)
            w->coordinator_key_opt = v;
        else {
            long n;
            if (kd_parse_long(v, &n) != 0 || n < 0 || n > 1024) {
                fprintf(stderr, "kdist-worker: --threads must be 0..1024, not '%s'\n", v);
                return -1;
            }
            w->threads = (int)n;
        }
    }
    if (!w->coordinator) {
        fprintf(stderr, "kdist-worker: --coordinator is required\n");
        usage(stderr);
        return -1;
    }
    if (id) {
        if (!id[0] || strlen(id) > 63) {
            fprintf(stderr, "kdist-worker: --id must be 1 to 63 characters\n");
            return -1;
        }
        snprintf(w->id, sizeof w->id, "%s", id);
    } else {
        char host[64];
        kd_node_hostname(host, sizeof host);
        snprintf(w->id, sizeof w->id, "%.48s-%d", host, (int)getpid());
    }
    return 0;
}

int main(int argc, char **argv) {
    kd_node_quiet_blas_threads(argv); /* the worker waits on the network between steps */
    worker_t w = {0};
    if (parse_args(&w, argc, argv) != 0) return 2;
    kd_node_signals_install();
    if (kd_log_init("worker", w.id, KD_LOG_INFO, w.log_path) != 0) {
        fprintf(stderr, "kdist-worker: cannot open log file %s\n", w.log_path);
        return 1;
    }
    char err[KD_ERR_LEN];
    if (kd_curve_client_from_args(w.key_opt, w.coordinator_key_opt, NULL, &w.curve, &w.curve_on,
                                  err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "WORKER-CURVE", "%s", err);
        kd_log_close();
        return 2;
    }
    if (w.curve_on)
        kd_log(KD_LOG_INFO, "WORKER-CURVE", "CurveZMQ on: public key %s, coordinator key %s",
               w.curve.self.public_z85, w.curve.server_z85);
    /* Until a Welcome brings the recipe's cluster settings. */
    kd_recipe_defaults(&w.recipe);
    atomic_init(&w.grads_in_flight, 0);

    int status = 1;
    w.ctx = zmq_ctx_new();
    if (!w.ctx) {
        kd_log(KD_LOG_ERROR, "WORKER-ZMQ", "cannot create a ZeroMQ context");
        goto cleanup;
    }
    kd_session_config_t cfg = {.role = KDIST__ROLE__WORKER,
                               .node_id = w.id,
                               .endpoint = w.coordinator,
                               .curve = w.curve_on ? &w.curve : NULL,
                               .threads = (uint32_t)w.threads,
                               .heartbeat_ms = (int)w.recipe.cluster.heartbeat_ms,
                               .timeout_ms = (int)w.recipe.cluster.heartbeat_timeout_ms,
                               .log_prefix = "WORKER",
                               .key_hint = "--coordinator-key"};
    w.session = kd_session_new(w.ctx, &cfg);
    int rc = run(&w);
    if (rc == STOP_NOW) {
        kd_session_goodbye(w.session, kd_node_stop_requested ? "signal" : "stop");
        status = 0;
    }
    kd_log(KD_LOG_INFO, "WORKER-EXIT",
           "%llu steps, %llu samples, %llu messages dropped, %llu batches nacked",
           (unsigned long long)w.steps, (unsigned long long)w.samples,
           (unsigned long long)w.dropped, (unsigned long long)w.nacks);
cleanup:
    kd_session_destroy(&w.session);
    kd_curve_watch_stop(&w.pull_watch, w.pull);
    if (w.pull) zmq_close(w.pull);
    if (w.ctx) zmq_ctx_term(w.ctx); /* releases any gradient still queued */
    use_own_buffers(&w);
    kd_model_destroy(&w.model);
    free(w.wire_grads);
    free_step_buffers(&w);
    for (int i = 0; i < w.n_endpoints; i++) free(w.endpoints[i]);
    free(w.endpoints);
    kd_log_close();
    return status;
}
