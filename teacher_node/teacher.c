/* kdist-teacher: a teacher node (DESIGN §2-4, docs/protocol.md). Joins the coordinator on a
 * DEALER, and streams the batches it is assigned (raw pixels + labels, and the teacher's logits
 * when the run distils: logits.h) on a bound PUSH socket.
 * The PUSH high-water mark is the back-pressure; one zmq_poll loop keeps control flowing while
 * workers are slow, so the node never blocks in a send.
 *   usage: kdist-teacher --coordinator ENDPOINT --id ID --recipe RECIPE
 *                        [--stream-bind ENDPOINT] [--log FILE] [--key FILE]
 *                        [--coordinator-key FILE|Z85] [section.key=value ...] */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kd_curve.h"
#include "kd_log.h"
#include "kd_node.h"
#include "kd_recipe.h"
#include "kd_session.h"
#include "kd_tokens.h"
#include "kd_train.h"
#include "kd_util.h"
#include "kd_wire.h"
#include "logits.h"

#define MAX_OVERRIDES            64
#define ENDPOINT_MAX             512
#define SENDS_PER_ROUND          16   /* batches sent between two looks at the DEALER */
#define STREAM_MAX_INBOUND       256  /* bytes: a PULL peer sends only READY and PING commands */
#define STREAM_MAX_INBOUND_CURVE 1024 /* ... and, under CurveZMQ, a ~300-byte INITIATE */

typedef struct {
    /* options */
    const char *coordinator, *id, *recipe_path, *stream_bind, *log_path;
    const char *key_opt, *coordinator_key_opt;
    const char *overrides[MAX_OVERRIDES];
    int n_overrides;

    kd_recipe_t recipe;
    kd_dataset_t *train;
    teacher_logits_t *logits; /* the teacher's logits of the split, when distilling */
    bool logits_ready;        /* opened for the current recipe (NULL when not distilling) */
    bool fill_failure_told, fill_wait_told;

    void *ctx, *push;
    kd_session_t *session;              /* with the coordinator */
    char stream_endpoint[ENDPOINT_MAX]; /* as announced to workers */
    bool welcomed;

    /* The current epoch's batching and what is left to stream of it. */
    kd_epoch_t *epoch;
    uint32_t *queue, *scratch; /* (n_batches) each */
    uint8_t *queued;           /* (n_batches) 1 while a batch id sits in the queue */
    size_t q_pos, q_len;       /* remaining: queue[q_pos..q_len) */

    uint64_t batches_streamed, assigns_dropped, messages_dropped;
    void *stream_monitor; /* connections libzmq refuses on the stream socket */
    long connections_refused;

    /* CurveZMQ (cluster.security.curve): one key pair for both sides, client of the
     * coordinator and server of the stream, whose ZAP handler admits only the recipe's keys */
    bool curve_on;
    kd_curve_client_t curve;
    kd_curve_keyset_t *authorized;
    kd_zap_t *zap;
    kd_log_limit_t drop_limit;
} teacher_t;

/* ---- helpers ----------------------------------------------------------------------------- */

static void usage(FILE *out) {
    fprintf(out, "usage: kdist-teacher --coordinator ENDPOINT --id ID --recipe RECIPE\n"
                 "                     [--stream-bind ENDPOINT] [--log FILE] [--key FILE]\n"
                 "                     [--coordinator-key FILE|Z85] [section.key=value ...]\n"
                 "  --key FILE  this node's CurveZMQ key pair, when the recipe sets\n"
                 "              cluster.security.curve (default: $KDIST_KEY)\n"
                 "  --coordinator-key  the coordinator's public key (default:\n"
                 "              $KDIST_COORDINATOR_KEY, then cluster.security.coordinator_key)\n");
}

/* Network input that does not check out: count it, say so at most once a second. */
static void drop(teacher_t *t, const char *what) {
    t->messages_dropped++;
    if (kd_log_allow(&t->drop_limit, 1.0))
        kd_log(KD_LOG_WARN, "KD-WIRE-DROP", "from the coordinator: %s (%llu dropped so far)", what,
               (unsigned long long)t->messages_dropped);
}

static void send_heartbeat(teacher_t *t) {
    Kdist__Heartbeat hb = KDIST__HEARTBEAT__INIT;
    hb.batches_streamed = t->batches_streamed;
    hb.messages_dropped = t->messages_dropped;
    kd_wire_refused(t->stream_monitor, "the stream socket", &t->connections_refused);
    hb.connections_refused = (uint64_t)t->connections_refused;
    Kdist__TeacherStats work = KDIST__TEACHER_STATS__INIT;
    char err[KD_ERR_LEN];
    if (t->logits && !t->fill_failure_told && teacher_logits_failed(t->logits, err, sizeof err)) {
        kd_log(KD_LOG_ERROR, "TEACHER-FILL",
               "the background fill stopped: %s; batches still get "
               "their logits, computed as they go",
               err);
        t->fill_failure_told = true;
    }
    if (t->logits) {
        teacher_logits_stats_t st;
        teacher_logits_stats(t->logits, &st);
        work.forward_samples = st.forward_samples;
        work.cache_hits = st.cache_hits;
        work.cache_misses = st.cache_misses;
        work.cache_corrupt = st.cache_corrupt;
        work.filling =
            !teacher_logits_complete(t->logits) && !teacher_logits_failed(t->logits, NULL, 0);
        hb.teacher = &work;
    }
    kd_session_heartbeat(t->session, &hb);
}

/* The final counters, before the member is removed; then Goodbye. */
static void send_goodbye(teacher_t *t, const char *reason) {
    if (t->welcomed && kd_session_socket(t->session)) send_heartbeat(t);
    kd_session_goodbye(t->session, reason);
}

static void clear_epoch(teacher_t *t) {
    kd_epoch_destroy(&t->epoch);
    free(t->queue);
    free(t->scratch);
    free(t->queued);
    t->queue = t->scratch = NULL;
    t->queued = NULL;
    t->q_pos = t->q_len = 0;
}

/* The recipe keys that name files. They are read on this node's machine, so a node that adopts
 * the coordinator's recipe (resolved on the coordinator's host) keeps its own. */
static const struct {
    const char *key;
    size_t off; /* of a char[KD_PATH_MAX] in kd_recipe_t */
    int count;  /* of them */
} local_paths[] = {
    {"data.dir", offsetof(kd_recipe_t, data.dir), 1},
    {"data.train_images", offsetof(kd_recipe_t, data.train_images), 1},
    {"data.train_labels", offsetof(kd_recipe_t, data.train_labels), 1},
    {"data.test_images", offsetof(kd_recipe_t, data.test_images), 1},
    {"data.test_labels", offsetof(kd_recipe_t, data.test_labels), 1},
    {"teacher.checkpoint", offsetof(kd_recipe_t, teacher.checkpoint), 1},
    {"cache.dir", offsetof(kd_recipe_t, cache.dir), 1},
    {"data.files", offsetof(kd_recipe_t, data.files), KD_MAX_DATA_FILES},
    {"data.tokenizer_dir", offsetof(kd_recipe_t, data.tokenizer_dir), 1},
};

static void keep_local_paths(kd_recipe_t *adopted, const kd_recipe_t *own) {
    for (size_t i = 0; i < sizeof local_paths / sizeof local_paths[0]; i++) {
        for (int k = 0; k < local_paths[i].count; k++) {
            char *theirs = (char *)adopted + local_paths[i].off + (size_t)k * KD_PATH_MAX;
            const char *ours = (const char *)own + local_paths[i].off + (size_t)k * KD_PATH_MAX;
            if (strcmp(theirs, ours) == 0) continue;
            kd_log(KD_LOG_INFO, "TEACHER-LOCAL-PATH",
                   "%s: this node's %s, not the coordinator's %s", local_paths[i].key,
                   ours[0] ? ours : "\"\"", theirs[0] ? theirs : "\"\"");
            memcpy(theirs, ours, KD_PATH_MAX);
        }
    }
    adopted->data.n_files = own->data.n_files;
}

/* The data settings and the seed (which keys the validation hold-out) decide the split. The
 * paths are this node's on both sides (keep_local_paths): whether its files hold the
 * coordinator's data, the paths cannot tell. */
static bool same_split(const kd_recipe_t *a, const kd_recipe_t *b) {
    return a->seed == b->seed && a->data.val_size == b->data.val_size &&
           a->data.train_subset == b->data.train_subset && a->data.format == b->data.format &&
           strcmp(a->data.tokenizer, b->data.tokenizer) == 0 && a->data.stride == b->data.stride &&
           a->data.val_fraction == b->data.val_fraction &&
           a->data.test_fraction == b->data.test_fraction &&
           a->student.gpt.context == b->student.gpt.context;
}

static int load_train(teacher_t *t, char *err, size_t errlen) {
    kd_splits_t s = {0};
    if (kd_splits_load(&t->recipe, &s, err, errlen) != 0) return -1;
    kd_dataset_destroy(&s.val);
    kd_dataset_destroy(&s.test);
    kd_dataset_destroy(&t->train);
    t->train = s.train;
    if (t->train->n == 0) return kd_err(err, errlen, "the training split is empty");
    return 0;
}

/* The settings that decide which logits a distilling teacher node serves. teacher.checkpoint
 * and cache.dir are this node's on both sides; the cache entry is chosen by the fingerprints of
 * the teacher's weights and of the data (teacher_logits). */
static bool same_logits(const kd_recipe_t *a, const kd_recipe_t *b) {
    return (a->distill.loss.alpha > 0) == (b->distill.loss.alpha > 0) &&
           a->teacher.n_layers == b->teacher.n_layers &&
           memcmp(a->teacher.layers, b->teacher.layers,
                  (size_t)a->teacher.n_layers * sizeof a->teacher.layers[0]) == 0 &&
           memcmp(&a->teacher.gpt, &b->teacher.gpt, sizeof a->teacher.gpt) == 0 &&
           a->teacher.drop_vocab_padding == b->teacher.drop_vocab_padding &&
           a->teacher.batch_size == b->teacher.batch_size &&
           a->cache.encoding == b->cache.encoding && a->cache.topk == b->cache.topk &&
           a->cache.samples == b->cache.samples &&
           (a->cache.encoding != KD_ENC_SAMPLED ||
            a->distill.loss.temperature == b->distill.loss.temperature) &&
           strcmp(a->cache.import, b->cache.import) == 0;
}

/* This node's place among cluster.teachers, to spread the cache fill: a numeric id, or a
 * hash of it. */
static int node_index(const teacher_t *t) {
    char *end;
    long v = strtol(t->id, &end, 10);
    if (*end != 0 || v < 0) {
        v = 0;
        for (const char *c = t->id; *c; c++) v = (v * 31 + (unsigned char)*c) % 1000003;
    }
    return (int)(v % (t->recipe.cluster.teachers > 0 ? t->recipe.cluster.teachers : 1));
}

/* When the run distils: the teacher's logits for the split, filled in the background. */
static int open_logits(teacher_t *t, char *err, size_t errlen) {
    teacher_logits_close(&t->logits);
    t->fill_failure_told = t->fill_wait_told = false;
    if (t->recipe.distill.loss.alpha <= 0) return 0;
    t->logits = teacher_logits_open(&t->recipe, t->train, err, errlen);
    if (!t->logits) return -1;
    if (teacher_logits_classes(t->logits) != t->train->num_classes) {
        kd_err(err, errlen, "the teacher has %d classes, the data %d",
               teacher_logits_classes(t->logits), t->train->num_classes);
        teacher_logits_close(&t->logits);
        return -1;
    }
    kd_log(KD_LOG_INFO, "TEACHER-LOGITS", "teacher logits from cache entry %s",
           teacher_logits_entry(t->logits));
    return teacher_logits_start_fill(t->logits, node_index(t), (int)t->recipe.cluster.teachers, err,
                                     errlen);
}

/* Streaming waits for the background fill: batches are random samples from the whole split, so
 * serving them earlier would mean computing nearly every row twice (on demand, then by the
 * fill). The wait happens once per teacher and dataset; later runs find the cache full. If the
 * fill failed, rows are computed as batches need them. */
static bool logits_ready(teacher_t *t) {
    if (!t->logits || teacher_logits_complete(t->logits) ||
        teacher_logits_failed(t->logits, NULL, 0))
        return true;
    if (!t->fill_wait_told) {
        kd_log(KD_LOG_INFO, "TEACHER-FILL-WAIT",
               "streaming starts when the teacher's logits are all in (cache %s)",
               teacher_logits_entry(t->logits));
        t->fill_wait_told = true;
    }
    return false;
}

/* ---- messages from the coordinator ------------------------------------------------------- */

/* The teacher model and batch the coordinator's recipe asks for, bounded before anything is
 * allocated: a model kd_model_plan accepts on this node's data, whose forward passes over
 * teacher.batch_size samples fit this machine's memory. */
static int check_adopted_sizes(const teacher_t *t, const kd_recipe_t *r, char *err, size_t errlen) {
    if (r->distill.loss.alpha <= 0) return 0; /* no teacher runs here */
    const kd_dataset_t *d = t->train;
    if (r->teacher.gpt.layers > 0) { /* a language model's teacher: its GPT config is checked */
        char why[KD_ERR_LEN];
        kd_gpt_config_t cfg = r->teacher.gpt;
        if (cfg.vocab == 0) cfg.vocab = t->train->num_classes; /* the data's, as it is built */
        if (kd_gpt_config_check(&cfg, why, sizeof why) != 0)
            return kd_err(err, errlen, "the coordinator's teacher.gpt: %s", why);
        const double need = kd_model_train_bytes_gpt(&cfg, r->teacher.batch_size);
        const uint64_t have = kd_node_memory_bytes();
        if (have && need > (double)have)
            return kd_err(err, errlen,
                          "the coordinator's recipe needs about %.1f GB for the teacher's "
                          "passes over %ld windows, more than this machine's %.1f GB",
                          need / 1e9, r->teacher.batch_size, (double)have / 1e9);
        return 0;
    }
    kd_model_t *plan = kd_xmalloc(sizeof *plan);
    char why[KD_ERR_LEN];
    int rc = 0;
    if (kd_model_plan(r->teacher.layers, r->teacher.n_layers,
                      (kd_shape_t){d->channels, d->height, d->width}, plan, why, sizeof why) != 0) {
        rc = kd_err(err, errlen, "the coordinator's teacher.layers: %s", why);
    } else {
        const double need = kd_model_train_bytes(plan, r->teacher.batch_size);
        const uint64_t have = kd_node_memory_bytes();
        if (have && need > (double)have)
            rc = kd_err(err, errlen,
                        "the coordinator's recipe needs about %.1f GB for the teacher's batches "
                        "of %ld, more than this machine's %.1f GB",
                        need / 1e9, r->teacher.batch_size, (double)have / 1e9);
    }
    free(plan);
    return rc;
}

static int on_welcome(teacher_t *t, const Kdist__Welcome *w) {
    char err[KD_ERR_LEN];
    kd_recipe_t r;
    if (!w->recipe_yaml || kd_recipe_parse("welcome", w->recipe_yaml, strlen(w->recipe_yaml), NULL,
                                           0, &r, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "TEACHER-BAD-WELCOME", "the coordinator's recipe does not load: %s",
               w->recipe_yaml ? err : "no recipe");
        return -1;
    }
    keep_local_paths(&r, &t->recipe);
    if (check_adopted_sizes(t, &r, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "TEACHER-BAD-WELCOME", "%s", err);
        return -1;
    }
    bool reload = !same_split(&t->recipe, &r);
    bool new_logits = reload || !t->logits_ready || !same_logits(&t->recipe, &r);
    t->recipe = r;
    if (reload) {
        teacher_logits_close(&t->logits); /* its fill thread reads the split being replaced */
        kd_log(KD_LOG_INFO, "TEACHER-RECIPE",
               "the coordinator's recipe has other data settings than %s; reloading the data",
               t->recipe_path);
        if (load_train(t, err, sizeof err) != 0) {
            kd_log(KD_LOG_ERROR, "TEACHER-DATA", "%s", err);
            return -1;
        }
    }
    if (w->windows_fingerprint && w->windows_fingerprint[0] && t->train->tokens) {
        /* the paths are this node's: only the windows they give can say it is the same data */
        char fp[KD_CACHE_FP_HEX + 1], ours[256];
        kd_tokens_windows_id(t->train, fp, ours, sizeof ours);
        if (strcmp(fp, w->windows_fingerprint) != 0) {
            kd_log(KD_LOG_ERROR, "TEACHER-WINDOWS",
                   "the coordinator trains on other windows than this node's data gives: its %s "
                   "(data fingerprint %s), this node's %s (data fingerprint %s); give this node "
                   "the same data files (data.dir, data.files), data.tokenizer and tokenizer "
                   "files",
                   w->windows ? w->windows : "?", w->windows_fingerprint, ours, fp);
            return -1;
        }
    }
    if (new_logits) {
        if (open_logits(t, err, sizeof err) != 0) {
            kd_log(KD_LOG_ERROR, "TEACHER-LOGITS", "%s", err);
            return -1;
        }
        t->logits_ready = true;
    }
    kd_session_set_timing(t->session,
                          w->heartbeat_ms > 0 ? (int)w->heartbeat_ms : (int)r.cluster.heartbeat_ms,
                          (int)r.cluster.heartbeat_timeout_ms);
    int hwm = (int)r.cluster.stream_hwm; /* applies to workers that connect from now on */
    zmq_setsockopt(t->push, ZMQ_SNDHWM, &hwm, sizeof hwm);
    t->welcomed = true;
    kd_log(KD_LOG_INFO, "TEACHER-WELCOME", "joined run %s: %zu training samples, batch %ld",
           w->run_id ? w->run_id : "?", t->train->n, r.train.batch_size);
    return 0;
}

/* Checks an Assign against the recipe and the split; returns NULL if fine, else why not. */
static const char *assign_problem(const teacher_t *t, const Kdist__Assign *a, size_t n_batches,
                                  char *buf, size_t buflen) {
    if (a->batch_size != (uint32_t)t->recipe.train.batch_size) {
        snprintf(buf, buflen, "batch_size %u, the recipe says %ld", a->batch_size,
                 t->recipe.train.batch_size);
        return buf;
    }
    if (a->epoch >= (uint32_t)t->recipe.train.epochs) {
        snprintf(buf, buflen, "epoch %u, the recipe has %ld epochs", a->epoch,
                 t->recipe.train.epochs);
        return buf;
    }
    if (t->epoch && a->epoch < t->epoch->epoch) {
        snprintf(buf, buflen, "epoch %u is older than the current epoch %u", a->epoch,
                 t->epoch->epoch);
        return buf;
    }
    if (a->n_batch_ids > n_batches) {
        snprintf(buf, buflen, "%zu batch ids, the epoch has %zu batches", a->n_batch_ids,
                 n_batches);
        return buf;
    }
    for (size_t i = 0; i < a->n_batch_ids; i++)
        if (a->batch_ids[i] >= n_batches) {
            snprintf(buf, buflen, "batch id %u out of range (%zu batches)", a->batch_ids[i],
                     n_batches);
            return buf;
        }
    return NULL;
}

static void on_assign(teacher_t *t, const Kdist__Assign *a) {
    const size_t B = (size_t)t->recipe.train.batch_size;
    const size_t n_batches = kd_epoch_count(t->train->n, B);
    char why[160];
    const char *problem = assign_problem(t, a, n_batches, why, sizeof why);
    if (problem) {
        t->assigns_dropped++;
        drop(t, problem);
        return;
    }
    if (a->seed != (uint64_t)t->recipe.seed && kd_log_allow(&t->drop_limit, 1.0))
        kd_log(KD_LOG_WARN, "TEACHER-SEED", "assign uses seed %llu, the recipe says %ld",
               (unsigned long long)a->seed, t->recipe.seed);

    bool new_epoch = !t->epoch || a->epoch != t->epoch->epoch || a->seed != t->epoch->seed;
    if (new_epoch) {
        clear_epoch(t);
        t->epoch = kd_epoch_new(a->seed, a->epoch, t->train->n, B);
        t->queue = kd_xmalloc(n_batches * sizeof *t->queue);
        t->scratch = kd_xmalloc(n_batches * sizeof *t->scratch);
        t->queued = kd_xcalloc(n_batches, 1);
    }
    /* New list first, then (restream only) what was left, without repeats. */
    size_t n = 0;
    if (!a->restream)
        for (size_t i = t->q_pos; i < t->q_len; i++) t->queued[t->queue[i]] = 0;
    for (size_t i = 0; i < a->n_batch_ids; i++) {
        uint32_t b = a->batch_ids[i];
        if (t->queued[b] == 2) continue; /* listed twice in this Assign */
        if (t->queued[b] == 1) t->queued[b] = 0;
        t->scratch[n++] = b;
        t->queued[b] = 2;
    }
    if (a->restream)
        for (size_t i = t->q_pos; i < t->q_len; i++)
            if (t->queued[t->queue[i]] == 1) t->scratch[n++] = t->queue[i];
    for (size_t i = 0; i < n; i++) t->queued[t->scratch[i]] = 1;
    uint32_t *tmp = t->queue;
    t->queue = t->scratch;
    t->scratch = tmp;
    t->q_pos = 0;
    t->q_len = n;
    kd_log(KD_LOG_INFO, "TEACHER-ASSIGN", "epoch %u: %zu batches assigned%s, %zu queued", a->epoch,
           a->n_batch_ids, a->restream ? " again (restream)" : "", n);
}

enum { KEEP_GOING = KD_SESSION_GO_ON, STOP_NOW = KD_SESSION_STOP, FATAL = KD_SESSION_FAIL };

/* A message the session leaves to the node (the Welcome is the first of its connection). */
static int on_message(teacher_t *t, kd_msg_t *m) {
    kd_env_t *env = m->env;
    switch (env->body_case) {
    case KDIST__ENVELOPE__BODY_WELCOME:
        return on_welcome(t, env->welcome) == 0 ? KEEP_GOING : FATAL;
    case KDIST__ENVELOPE__BODY_ASSIGN:
        if (!t->welcomed) return drop(t, "assign before welcome"), KEEP_GOING;
        on_assign(t, env->assign);
        return KEEP_GOING;
    case KDIST__ENVELOPE__BODY_CONTROL:
        if (env->control->kind == KDIST__CONTROL__KIND__STOP) {
            kd_log(KD_LOG_INFO, "TEACHER-STOP", "the coordinator ends the run");
            return STOP_NOW;
        }
        drop(t, "a control message other than stop");
        return KEEP_GOING;
    default: {
        char what[64];
        snprintf(what, sizeof what, "unexpected %s message", kd_wire_body_name(env));
        drop(t, what);
        return KEEP_GOING;
    }
    }
}

/* Reads everything waiting on the DEALER. */
/* What the session reports, other than a message; it logged what was fatal. A lost
 * connection drops what was left to stream (a new membership gets a new Assign). */
static int on_session_event(void *node, kd_session_event_t ev, const char *err) {
    teacher_t *t = node;
    if (ev == KD_SESSION_BAD) drop(t, err);
    if (ev == KD_SESSION_HELLO || ev == KD_SESSION_LOST) {
        t->welcomed = false;
        clear_epoch(t);
    }
    return KEEP_GOING;
}

static int on_message_for_teacher(void *node, kd_msg_t *m) {
    return on_message(node, m);
}

static const kd_session_handlers_t session_handlers = {on_message_for_teacher, on_session_event};

static int drain_dealer(teacher_t *t) {
    return kd_session_pump(t->session, &session_handlers, t);
}

/* ---- streaming --------------------------------------------------------------------------- */

static void free_buffer(void *data, void *hint) {
    (void)hint;
    free(data);
}

/* Sends batch b of the queue's head with its payloads (released by ZeroMQ, or here on
 * failure). Returns 1 sent, 0 would block, -1 error. */
static int send_batch(teacher_t *t, uint32_t b, kd_wire_tensor_t *tensors, int n_tensors) {
    Kdist__BatchRef ref = KDIST__BATCH_REF__INIT;
    ref.epoch = t->epoch->epoch;
    ref.batch_id = b;
    Kdist__Batch batch = KDIST__BATCH__INIT;
    batch.ref = &ref;
    batch.teacher_id = (char *)t->id;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_BATCH;
    env.batch = &batch;
    /* On failure kd_wire_send has released the buffers; the batch stays queued. */
    if (kd_wire_send(t->push, NULL, 0, &env, tensors, n_tensors, ZMQ_DONTWAIT) != 0) {
        if (errno == EAGAIN || errno == EINTR) return 0;
        kd_log(KD_LOG_ERROR, "TEACHER-STREAM-FAIL", "cannot send batch %u: %s", b,
               zmq_strerror(errno));
        return -1;
    }
    t->queued[b] = 0;
    t->q_pos++;
    t->batches_streamed++;
    return 1;
}

/* A language model's batch: its windows of token ids and, when distilling, the teacher's
 * records of their positions in the cache's encoding (never decoded here). */
static int send_windows(teacher_t *t, uint32_t b, const uint32_t *ids, size_t B) {
    const kd_dataset_t *d = t->train;
    const size_t T = d->window - 1, rb = t->logits ? teacher_logits_record_bytes(t->logits) : 0;
    uint32_t *windows = kd_xmalloc(B * d->window * sizeof *windows);
    kd_dataset_gather_windows(d, ids, B, windows);
    uint8_t *records = rb ? kd_xmalloc(B * T * rb) : NULL;
    char err[KD_ERR_LEN];
    if (records && teacher_logits_get_records(t->logits, ids, B, records, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "TEACHER-LOGITS", "batch %u: %s", b, err);
        free(windows);
        free(records);
        return -1;
    }
    kd_wire_tensor_t tensors[2] = {
        /* ids are below the vocabulary (< 2^31): the same bits as int32 */
        kd_layout_tensor(&KD_LAYOUT_TOKENS, (int64_t[]){(int64_t)B, (int64_t)d->window}),
        kd_layout_tensor(&KD_LAYOUT_TEACHER_RECORDS,
                         (int64_t[]){(int64_t)B, (int64_t)T, (int64_t)rb}),
    };
    tensors[0].data = windows;
    tensors[0].nbytes = B * d->window * sizeof *windows;
    tensors[1].data = records;
    tensors[1].nbytes = B * T * rb;
    tensors[0].free_fn = tensors[1].free_fn = free_buffer;
    return send_batch(t, b, tensors, records ? 2 : 1);
}

/* Sends the head of the queue without blocking. Returns 1 sent, 0 would block, -1 error. */
static int send_next_batch(teacher_t *t) {
    const uint32_t b = t->queue[t->q_pos];
    const uint32_t *ids;
    const size_t B = kd_epoch_batch(t->epoch, b, &ids);
    KD_ASSERT(B > 0); /* ids were checked against n_batches on arrival */
    const kd_dataset_t *d = t->train;
    if (d->tokens) return send_windows(t, b, ids, B);
    uint8_t *pixels = kd_xmalloc(B * d->sample_dim);
    int32_t *labels = kd_xmalloc(B * sizeof *labels);
    for (size_t i = 0; i < B; i++) {
        memcpy(pixels + i * d->sample_dim, d->pixels + (size_t)ids[i] * d->sample_dim,
               d->sample_dim);
        labels[i] = d->labels[ids[i]];
    }
    const size_t C = (size_t)d->num_classes;
    float *logits = t->logits ? kd_xmalloc(B * C * sizeof *logits) : NULL;
    char err[KD_ERR_LEN];
    if (logits && teacher_logits_get(t->logits, ids, B, logits, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "TEACHER-LOGITS", "batch %u: %s", b, err);
        free(pixels);
        free(labels);
        free(logits);
        return -1;
    }
    kd_wire_tensor_t tensors[3] = {
        kd_layout_tensor(&KD_LAYOUT_INPUTS,
                         (int64_t[]){(int64_t)B, d->channels, d->height, d->width}),
        kd_layout_tensor(&KD_LAYOUT_LABELS, (int64_t[]){(int64_t)B}),
        kd_layout_tensor(&KD_LAYOUT_TEACHER_LOGITS, (int64_t[]){(int64_t)B, (int64_t)C}),
    };
    const void *data[3] = {pixels, labels, logits};
    const size_t nbytes[3] = {B * d->sample_dim, B * sizeof *labels, B * C * sizeof *logits};
    for (int i = 0; i < 3; i++) {
        tensors[i].data = data[i];
        tensors[i].nbytes = nbytes[i];
        tensors[i].free_fn = free_buffer;
    }
    return send_batch(t, b, tensors, logits ? 3 : 2);
}

static int stream_some(teacher_t *t) {
    for (int i = 0; i < SENDS_PER_ROUND && t->q_pos < t->q_len; i++) {
        int rc = send_next_batch(t);
        if (rc < 0) return FATAL;
        if (rc == 0) break;
    }
    if (t->q_pos == t->q_len && t->q_len > 0) {
        kd_log(KD_LOG_INFO, "TEACHER-STREAMED", "epoch %u: every assigned batch is streamed",
               t->epoch->epoch);
        t->q_pos = t->q_len = 0;
    }
    return KEEP_GOING;
}

/* ---- main loop --------------------------------------------------------------------------- */

static int poll_timeout_ms(const teacher_t *t, double now) {
    double next = now + 1.0;
    double session = kd_session_deadline(t->session);
    if (session < next) next = session;
    double ms = (next - now) * 1000.0 + 1.0;
    return ms < 0 ? 0 : (int)ms;
}

static int run(teacher_t *t) {
    char err[KD_ERR_LEN];
    for (;;) {
        if (kd_node_stop_requested) {
            kd_log(KD_LOG_INFO, "TEACHER-SIGNAL", "stop requested");
            return STOP_NOW;
        }
        double now = kd_now();
        int action = kd_session_answer(&session_handlers, t,
                                       kd_session_tick(t->session, now, err, sizeof err), err);
        if (action != KEEP_GOING) return action;
        if (t->welcomed && kd_session_heartbeat_due(t->session, now)) send_heartbeat(t);
        void *dealer = kd_session_socket(t->session);
        zmq_pollitem_t items[2];
        int n = 0, dealer_i = -1, push_i = -1;
        if (dealer) {
            items[n] = (zmq_pollitem_t){.socket = dealer, .events = ZMQ_POLLIN};
            dealer_i = n++;
        }
        if (t->q_pos < t->q_len && logits_ready(t)) {
            items[n] = (zmq_pollitem_t){.socket = t->push, .events = ZMQ_POLLOUT};
            push_i = n++;
        }
        int timeout = poll_timeout_ms(t, now);
        if (t->q_pos < t->q_len && push_i < 0 && timeout > 50) timeout = 50; /* fill progress */
        int rc = zmq_poll(items, n, timeout);
        if (rc < 0) {
            if (errno == EINTR) continue;
            kd_log(KD_LOG_ERROR, "TEACHER-POLL", "zmq_poll: %s", zmq_strerror(errno));
            return FATAL;
        }
        if (dealer_i >= 0 && (items[dealer_i].revents & ZMQ_POLLIN)) {
            action = drain_dealer(t);
            if (action != KEEP_GOING) return action;
        }
        /* A reconnect or a new Assign in drain_dealer may have emptied the queue. */
        if (push_i >= 0 && (items[push_i].revents & ZMQ_POLLOUT) && t->q_pos < t->q_len) {
            action = stream_some(t);
            if (action != KEEP_GOING) return action;
        }
    }
}

static int parse_args(teacher_t *t, int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char **dst = NULL;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(0);
        }
        if (strcmp(a, "--coordinator") == 0)
            dst = &t->coordinator;
        else if (strcmp(a, "--id") == 0)
            dst = &t->id;
        else if (strcmp(a, "--recipe") == 0)
            dst = &t->recipe_path;
        else if (strcmp(a, "--stream-bind") == 0)
            dst = &t->stream_bind;
        else if (strcmp(a, "--log") == 0)
            dst = &t->log_path;
        else if (strcmp(a, "--key") == 0)
            dst = &t->key_opt;
        else if (strcmp(a, "--coordinator-key") == 0)
            dst = &t->coordinator_key_opt;
        if (dst) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kdist-teacher: %s needs a value\n", a);
                return -1;
            }
            *dst = argv[++i];
        } else if (a[0] != '-' && strchr(a, '=')) {
            if (t->n_overrides == MAX_OVERRIDES) {
                fprintf(stderr, "kdist-teacher: more than %d overrides\n", MAX_OVERRIDES);
                return -1;
            }
            t->overrides[t->n_overrides++] = a;
        } else {
            fprintf(stderr, "kdist-teacher: unknown argument '%s'\n", a);
            usage(stderr);
            return -1;
        }
    }
    if (!t->coordinator || !t->id || !t->recipe_path) {
        fprintf(stderr, "kdist-teacher: --coordinator, --id and --recipe are required\n");
        usage(stderr);
        return -1;
    }
    if (!t->id[0] || strlen(t->id) > 63) {
        fprintf(stderr, "kdist-teacher: --id must be 1 to 63 characters\n");
        return -1;
    }
    return 0;
}

/* cluster.security from this node's recipe: its key pair and the coordinator's key (options,
 * environment, then the recipe), and the workers' keys its stream admits. */
static int setup_curve(teacher_t *t, char *err, size_t errlen) {
    const kd_recipe_t *r = &t->recipe;
    if (!r->cluster.security.curve) {
        if (t->key_opt || t->coordinator_key_opt)
            return kd_err(err, errlen,
                          "%s given but %s has cluster.security.curve off: turn it on, or drop "
                          "the option",
                          t->key_opt ? "--key" : "--coordinator-key", t->recipe_path);
        return 0;
    }
    char fallback[KD_PATH_MAX];
    snprintf(fallback, sizeof fallback, "%s", r->cluster.security.coordinator_key);
    if (kd_curve_client_from_args(t->key_opt, t->coordinator_key_opt, fallback, &t->curve,
                                  &t->curve_on, err, errlen) != 0)
        return -1;
    if (!t->curve_on)
        return kd_err(err, errlen,
                      "%s sets cluster.security.curve: give this teacher node its key pair with "
                      "--key FILE (made by `kdist keygen`) or set %s",
                      t->recipe_path, KD_CURVE_ENV_KEY);
    return kd_curve_keyset_load(r, t->recipe_path, &t->authorized, err, errlen);
}

/* Binds the stream socket; a wildcard address is announced under this host's name. */
static int bind_stream(teacher_t *t, char *err, size_t errlen) {
    /* the gatekeeper before the socket: without a handler libzmq lets any key in */
    if (t->curve_on &&
        !(t->zap = kd_zap_new(t->ctx, t->authorized, "TEACHER-CURVE-REFUSED", err, errlen)))
        return -1;
    t->push = zmq_socket(t->ctx, ZMQ_PUSH);
    if (!t->push) return kd_err(err, errlen, "cannot create socket: %s", zmq_strerror(errno));
    int zero = 0, hwm = (int)t->recipe.cluster.stream_hwm;
    zmq_setsockopt(t->push, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(t->push, ZMQ_SNDHWM, &hwm, sizeof hwm);
    /* Workers never send data here: anything larger than a handshake command is an outsider's
     * junk, refused before libzmq allocates the size it claims. */
    int64_t max_in = t->curve_on ? STREAM_MAX_INBOUND_CURVE : STREAM_MAX_INBOUND;
    zmq_setsockopt(t->push, ZMQ_MAXMSGSIZE, &max_in, sizeof max_in);
    if (t->curve_on && kd_wire_curve_server(t->push, &t->curve.self, err, errlen) != 0) return -1;
    /* A ZAP domain makes libzmq refuse ZMTP 1.0/2.0 peers, which skip the socket-type check
     * and could otherwise take batches; with no ZAP handler, NULL-mechanism peers still join. */
    zmq_setsockopt(t->push, ZMQ_ZAP_DOMAIN, KD_WIRE_ZAP_DOMAIN, strlen(KD_WIRE_ZAP_DOMAIN));
    const char *ep = t->stream_bind ? t->stream_bind : "tcp://127.0.0.1:*";
    char bound[ENDPOINT_MAX];
    if (kd_curve_check_plaintext_bind(&t->recipe, ep, "--stream-bind", err, errlen) != 0) return -1;
    if (kd_socket_bind(t->push, ep, bound, sizeof bound, err, errlen) != 0) return -1;
    if (!(t->stream_monitor = kd_wire_monitor(t->ctx, t->push, "stream", err, errlen))) return -1;
    const char *wild = "tcp://0.0.0.0:";
    if (strncmp(bound, wild, strlen(wild)) == 0) {
        char host[256];
        kd_node_hostname(host, sizeof host);
        snprintf(t->stream_endpoint, sizeof t->stream_endpoint, "tcp://%.255s:%.16s", host,
                 bound + strlen(wild));
    } else {
        snprintf(t->stream_endpoint, sizeof t->stream_endpoint, "%s", bound);
    }
    return 0;
}

int main(int argc, char **argv) {
    teacher_t t = {0};
    if (parse_args(&t, argc, argv) != 0) return 2;
    kd_node_signals_install();
    if (kd_log_init("teacher", t.id, KD_LOG_INFO, t.log_path) != 0) {
        fprintf(stderr, "kdist-teacher: cannot open log file %s\n", t.log_path);
        return 1;
    }
    int status = 1;
    char err[KD_ERR_LEN];
    if (kd_recipe_load(t.recipe_path, t.overrides, t.n_overrides, &t.recipe, err, sizeof err) !=
            0 ||
        kd_recipe_check_cluster(&t.recipe, t.recipe_path, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "TEACHER-RECIPE", "%s", err);
        goto cleanup;
    }
    kd_log_level_t level;
    if (kd_log_level_parse(t.recipe.logging.level, &level) == 0) kd_log_threshold = level;
    if (setup_curve(&t, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "TEACHER-CURVE", "%s", err);
        status = 2;
        goto cleanup;
    }
    kd_set_threads((int)t.recipe.train.threads); /* the teacher's forward passes */
    if (load_train(&t, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "TEACHER-DATA", "%s", err);
        goto cleanup;
    }
    t.ctx = zmq_ctx_new();
    if (!t.ctx || bind_stream(&t, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "TEACHER-BIND", "%s", t.ctx ? err : "cannot create a ZeroMQ context");
        status = 2;
        goto cleanup;
    }
    kd_session_config_t cfg = {.role = KDIST__ROLE__TEACHER,
                               .node_id = t.id,
                               .endpoint = t.coordinator,
                               .curve = t.curve_on ? &t.curve : NULL,
                               .stream_endpoint = t.stream_endpoint,
                               .heartbeat_ms = (int)t.recipe.cluster.heartbeat_ms,
                               .timeout_ms = (int)t.recipe.cluster.heartbeat_timeout_ms,
                               .log_prefix = "TEACHER",
                               .key_hint = "--coordinator-key, cluster.security.coordinator_key"};
    t.session = kd_session_new(t.ctx, &cfg);
    int rc = run(&t);
    if (rc == STOP_NOW) {
        send_goodbye(&t, kd_node_stop_requested ? "signal" : "stop");
        status = 0;
    }
    kd_wire_refused(t.stream_monitor, "the stream socket", &t.connections_refused);
    if (t.logits) {
        teacher_logits_stats_t st;
        teacher_logits_stats(t.logits, &st);
        kd_log(KD_LOG_INFO, "TEACHER-LOGITS",
               "%llu samples through the teacher (%llu on demand); cache blocks: %llu hits, %llu "
               "misses, %llu corrupt",
               (unsigned long long)st.forward_samples, (unsigned long long)st.on_demand_samples,
               (unsigned long long)st.cache_hits, (unsigned long long)st.cache_misses,
               (unsigned long long)st.cache_corrupt);
    }
    kd_log(KD_LOG_INFO, "TEACHER-EXIT",
           "%llu batches streamed, %llu messages dropped (%llu assigns), %ld connections refused",
           (unsigned long long)t.batches_streamed, (unsigned long long)t.messages_dropped,
           (unsigned long long)t.assigns_dropped, t.connections_refused);
cleanup:
    kd_wire_monitor_close(t.push, t.stream_monitor);
    kd_session_destroy(&t.session);
    kd_socket_close_draining(t.push);
    kd_zap_destroy(&t.zap);
    free(t.authorized);
    if (t.ctx) zmq_ctx_term(t.ctx);
    clear_epoch(&t);
    teacher_logits_close(&t.logits);
    kd_dataset_destroy(&t.train);
    kd_log_close();
    return status;
}
