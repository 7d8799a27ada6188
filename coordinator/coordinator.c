/* kdist-coordinator: the parameter server and control plane (DESIGN §2-3). It owns the
 * student's weights and optimizer, the membership, the per-epoch ledger of applied batches,
 * the assignment of batches to teacher nodes, evaluation, checkpoints and the run's outputs.
 * Message flow: docs/protocol.md. Single-threaded apart from the evaluator actor.
 *   usage: kdist-coordinator --recipe RECIPE --run-dir DIR [--resume] [--key FILE]
 *                            [section.key=value ...] */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "checkpoint.h"
#include "coordinator.h"
#include "kd_checkpoint.h"
#include "kd_curve.h"
#include "kd_log.h"
#include "kd_node.h"

#define MAX_OVERRIDES          64
#define MAX_SHM_SLOTS          8
#define TEACHER_GATHER_SECONDS 2.0
#define COORD_MAX_LOST         32

typedef enum { RUN_RUNNING = 0, RUN_FINISHING } run_phase_t;

typedef struct {
    kd_recipe_t r;
    char run_dir[KD_PATH_MAX];
    char ckpt_dir[KD_PATH_MAX + 32];
    char endpoint[256];
    void *ctx, *router;
    /* CurveZMQ (cluster.security.curve): our pair, the keys that may connect, their gatekeeper */
    kd_curve_pair_t curve_pair;
    kd_curve_roles_t keys; /* what each key may do */
    bool curve;
    kd_zap_t *zap;
    /* the local control channel: ipc:// in a 0700 directory, for stop, drain and checkpoint
     * from this machine's owner of the run (the launcher, `kdist drain`) */
    void *control;
    char control_endpoint[KD_PATH_MAX + 64];
    char control_dir[KD_PATH_MAX + 32];
    bool control_dir_temporary;
    kd_splits_t data;
    kd_model_t *model;
    kd_optim_t *opt;
    kd_schedule_config_t sched;
    evaluator_t *eval;
    kd_metrics_t *metrics;
    coord_state_t s;
    double t0;
    run_phase_t phase;
    const char *status; /* summary status once finishing */
    double finish_deadline;

    member_t members[COORD_MAX_MEMBERS];
    int workers_max;
    coord_event_t events[COORD_MAX_EVENTS];
    int n_events;
    /* members that ended without a goodbye (died or were evicted), for summary.json: the
     * first COORD_MAX_LOST of them, and how many in all */
    coord_event_t lost[COORD_MAX_LOST];
    long n_lost;

    /* the current epoch */
    size_t n_batches, applied_count;
    uint8_t *applied; /* (n_batches) 1 = applied this epoch */
    uint8_t *in_step; /* (n_batches) 1 = collected in the open sync step */
    uint32_t *nacked; /* (n_batches) times workers refused the batch this epoch */
    int *owner;       /* (n_batches) the member index of the teacher node it was assigned to */
    bool assigned;    /* this epoch's batches went out */
    double assign_at; /* when to hand them out with fewer teacher nodes than cluster.teachers */
    double last_progress;

    /* the open sync step: gradients held until it closes */
    kd_msg_t step_msgs[COORD_MAX_MEMBERS];
    int step_member[COORD_MAX_MEMBERS];
    int step_count;
    float *step_grads[COORD_MAX_MEMBERS];  /* each push's gradient: its frame or shared memory */
    float *step_copies[COORD_MAX_MEMBERS]; /* owned copies of those whose worker left */
    float *step_grad;                      /* (n_params) weighted average */

    /* the weights of the current version, shared by every reply */
    zmq_msg_t weights_msg;
    bool weights_valid;

    /* the same-host fast path (kd_shm.h): weight versions in slots, and how many workers were
     * pointed to each slot and have not yet said they read it */
    kd_shm_t weights_shm;
    uint64_t shm_token;
    uint64_t slot_version[MAX_SHM_SLOTS];
    int slot_readers[MAX_SHM_SLOTS];
    char hostname[64];

    /* metrics window */
    double win_loss, win_t0, win_staleness;
    long win_samples, win_correct, win_pushes, win_steps;
    double win_phase[4];
    double *win_layer_fwd, *win_layer_bwd;
    long messages_dropped;
    void *router_monitor;     /* connections libzmq refuses on the ROUTER */
    long connections_refused; /* never became a message: raw bytes, old protocols */
    long stale_dropped;       /* pushes from before a coordinator restart */
    long hellos_refused;      /* Hellos for an id that is live on another connection */
    /* gradients that never reach the optimizer: non-finite, or beyond max_gradient_norm */
    long gradients_rejected;
    long rejected_in_a_row; /* across the cluster, since the last accepted push */
    long pushes_accepted;
    long evicted;
    long nacks;           /* batches workers could not use */
    long control_refused; /* control commands from peers that may not give them */
    char evicted_keys[16][KD_CURVE_Z85_LEN + 1]; /* refused if they say hello again */
    int n_evicted_keys;
    char fail_reason[512];  /* why the run ended "failed" */
    bool weights_poisoned;  /* an update made them non-finite: nothing is saved or evaluated */
    member_t teachers_gone; /* the logit counters of teacher incarnations that left, summed */
    kd_log_limit_t drop_limit;
    eval_result_t last_eval;
    bool have_eval;
    long last_eval_step, last_ckpt_step;
    /* training throughput: from the first gradient received to the last one applied */
    double first_push, last_apply;
    long samples_applied;
} coord_t;

/* ---- helpers ----------------------------------------------------------------------------- */

static double elapsed(coord_t *c) {
    return c->s.elapsed + (kd_now() - c->t0);
}

static const char *role_name(Kdist__Role role) {
    switch (role) {
    case KDIST__ROLE__TEACHER:
        return "teacher";
    case KDIST__ROLE__WORKER:
        return "worker";
    case KDIST__ROLE__CLIENT:
        return "client";
    default:
        return "unknown";
    }
}

static void add_teacher_counters(member_t *sum, const member_t *m) {
    sum->forward_samples += m->forward_samples;
    sum->cache_hits += m->cache_hits;
    sum->cache_misses += m->cache_misses;
    sum->cache_corrupt += m->cache_corrupt;
}

static void add_event(coord_t *c, const char *event, const char *role, const char *id) {
    if (c->n_events == COORD_MAX_EVENTS) {
        memmove(c->events, c->events + 1, sizeof c->events[0] * (COORD_MAX_EVENTS - 1));
        c->n_events--;
    }
    coord_event_t *e = &c->events[c->n_events++];
    e->time = elapsed(c);
    snprintf(e->event, sizeof e->event, "%s", event);
    snprintf(e->role, sizeof e->role, "%s", role);
    snprintf(e->id, sizeof e->id, "%s", id);
}

static void drop(coord_t *c, const kd_msg_t *msg, const char *why) {
    c->messages_dropped++;
    if (kd_log_allow(&c->drop_limit, 1.0)) {
        char peer[300];
        kd_msg_peer_text(msg, peer, sizeof peer);
        kd_log(KD_LOG_WARN, "KD-WIRE-DROP", "dropped a message from '%s': %s (%ld dropped so far)",
               peer, why, c->messages_dropped);
    }
}

static member_t *find_member(coord_t *c, const uint8_t *rid, size_t len) {
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (m->used && m->rid_len == len && memcmp(m->rid, rid, len) == 0) return m;
    }
    return NULL;
}

static int live_count(coord_t *c, Kdist__Role role) {
    int n = 0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (c->members[i].used && c->members[i].role == role) n++;
    return n;
}

static int send_to(coord_t *c, member_t *m, kd_env_t *env, const kd_wire_tensor_t *t, int n) {
    int rc = kd_wire_send(c->router, m->rid, m->rid_len, env, t, n, ZMQ_DONTWAIT);
    if (rc == 0)
        m->last_sent = kd_now();
    else if (kd_log_allow(&c->drop_limit, 1.0))
        kd_log(KD_LOG_WARN, "COORD-SEND-FAIL", "cannot send %s to %s %s: %s",
               kd_wire_body_name(env), role_name(m->role), m->node_id, zmq_strerror(errno));
    return rc;
}

/* Whether libzmq still has a connection for m: a heartbeat to it does not come back
 * EHOSTUNREACH (ROUTER_MANDATORY). */
static bool member_reachable(coord_t *c, member_t *m) {
    Kdist__Heartbeat h = KDIST__HEARTBEAT__INIT;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &h;
    return kd_wire_send(c->router, m->rid, m->rid_len, &env, NULL, 0, ZMQ_DONTWAIT) == 0 ||
           errno != EHOSTUNREACH;
}

static void free_snapshot(void *data, void *hint) {
    (void)hint;
    free(data);
}

static void refresh_weights(coord_t *c) {
    if (c->weights_valid) return;
    size_t bytes = c->model->n_params * sizeof(float);
    float *snapshot = kd_xmalloc(bytes);
    memcpy(snapshot, c->model->params, bytes);
    zmq_msg_init_data(&c->weights_msg, snapshot, bytes, free_snapshot, NULL);
    c->weights_valid = true;
}

static void invalidate_weights(coord_t *c) {
    if (c->weights_valid) zmq_msg_close(&c->weights_msg);
    c->weights_valid = false;
}

static kd_wire_tensor_t weights_tensor(coord_t *c) {
    refresh_weights(c);
    kd_wire_tensor_t t = {.name = "weights",
                          .dtype = KD_DTYPE_F32,
                          .ndim = 1,
                          .shape = {(int64_t)c->model->n_params},
                          .share = &c->weights_msg};
    return t;
}

/* ---- the same-host fast path (kd_shm.h) ------------------------------------------------- */

static void setup_shared_memory(coord_t *c) {
    if (!c->r.cluster.shared_memory) return;
    kd_node_hostname(c->hostname, sizeof c->hostname);
    if (getrandom(&c->shm_token, sizeof c->shm_token, 0) != sizeof c->shm_token)
        c->shm_token = (uint64_t)getpid() << 32 ^ (uint64_t)(kd_now() * 1e6);
    long slots = c->r.cluster.workers + 1; /* one per worker holding a version, one to write */
    if (slots > MAX_SHM_SLOTS) slots = MAX_SHM_SLOTS;
    char err[KD_ERR_LEN];
    if (kd_shm_create(&c->weights_shm, "kdist-weights", (uint32_t)slots, c->model->n_params,
                      c->shm_token, err, sizeof err) != 0) {
        kd_log(KD_LOG_WARN, "COORD-SHM", "%s: workers on this machine will use TCP", err);
        return;
    }
    for (long i = 0; i < slots; i++) c->slot_version[i] = UINT64_MAX;
}

/* A gradient segment for a worker on this machine, described in *offer; false to use TCP. */
static bool offer_shared_memory(coord_t *c, member_t *m, Kdist__SharedMemory *offer) {
    if (!c->weights_shm.base || m->role != KDIST__ROLE__WORKER || strcmp(m->host, c->hostname) != 0)
        return false;
    char name[96], err[KD_ERR_LEN];
    snprintf(name, sizeof name, "kdist-gradient-%s", m->node_id);
    if (kd_shm_create(&m->grad_shm, name, 1, c->model->n_params, c->shm_token, err, sizeof err) !=
        0) {
        kd_log(KD_LOG_WARN, "COORD-SHM", "%s: worker %s will use TCP", err, m->node_id);
        return false;
    }
    offer->pid = (uint32_t)getpid();
    offer->weights_fd = c->weights_shm.fd;
    offer->weight_slots = c->weights_shm.n_slots;
    offer->gradient_fd = m->grad_shm.fd;
    offer->token = c->shm_token;
    return true;
}

/* The slot holding the current version, written now if none does; -1 when every slot is still
 * being read by some worker (the answer then goes over TCP). */
static int current_slot(coord_t *c) {
    int free_slot = -1;
    for (uint32_t s = 0; s < c->weights_shm.n_slots; s++) {
        if (c->slot_version[s] == c->s.version) return (int)s;
        if (c->slot_readers[s] == 0 && free_slot < 0) free_slot = (int)s;
    }
    if (free_slot < 0) return -1;
    kd_shm_write(&c->weights_shm, (uint32_t)free_slot, c->s.version, c->model->params);
    c->slot_version[free_slot] = c->s.version;
    return free_slot;
}

static void release_slot(coord_t *c, member_t *m) {
    if (m->held_slot) c->slot_readers[m->held_slot - 1]--;
    m->held_slot = 0;
}

/* The worker pushed a gradient computed on `version`: it is done with any slot it was pointed to
 * up to then (it computes on its slot in place, so an idle worker keeps its slot). */
static void note_weights_held(coord_t *c, member_t *m, uint64_t version) {
    if (m->held_slot && version >= c->slot_version[m->held_slot - 1]) release_slot(c, m);
}

/* A push's gradient, from its frame or the worker's segment; NULL with why set if unusable. */
static float *push_gradient(coord_t *c, member_t *m, kd_msg_t *msg, char *why, size_t whylen) {
    const Kdist__PushGradient *p = msg->env->push;
    m->shm_active = p->shared_memory;
    if (p->shared_memory) {
        if (!m->grad_shm.base) {
            kd_err(why, whylen, "a gradient in shared memory that was never set up");
            return NULL;
        }
        float *g = kd_shm_peek(&m->grad_shm, 0, p->clock);
        if (!g)
            kd_err(why, whylen, "the shared-memory gradient is not push %llu's",
                   (unsigned long long)p->clock);
        return g;
    }
    int64_t shape[1] = {(int64_t)c->model->n_params};
    return (float *)kd_msg_tensor(msg, 0, "gradient", KD_DTYPE_F32, 1, shape, why, whylen);
}

/* A worker leaves while the open sync step holds its shared-memory gradient: keep a copy. */
static void keep_step_gradients(coord_t *c, member_t *m) {
    const int index = (int)(m - c->members);
    for (int k = 0; k < c->step_count; k++)
        if (c->step_member[k] == index && !c->step_copies[k] &&
            c->step_msgs[k].env->push->shared_memory) {
            size_t bytes = c->model->n_params * sizeof(float);
            c->step_copies[k] = kd_xmalloc(bytes);
            memcpy(c->step_copies[k], c->step_grads[k], bytes);
            c->step_grads[k] = c->step_copies[k];
        }
}

/* The answer to a worker's push (or to a waiting worker): the Weights message's flags. */
typedef enum {
    REPLY_WEIGHTS = 0, /* the current weights: go on */
    REPLY_WAIT,        /* SSP: too far ahead, hold until the next Weights */
    REPLY_STOP,        /* the run is over for it: say goodbye */
    REPLY_REDO,        /* sync: too late for its step, the same batch again on these weights */
    REPLY_DROPPED,     /* the gradient was not applied (already counted, stale or rejected) */
} reply_t;

/* The reply that lets a worker go on: the weights, or stop once the run is finishing. */
static reply_t go_on(coord_t *c) {
    return c->phase == RUN_FINISHING ? REPLY_STOP : REPLY_WEIGHTS;
}

/* Weights to a worker, with the current weights unless it waits or stops. */
static void send_weights(coord_t *c, member_t *m, reply_t reply) {
    Kdist__Weights w = KDIST__WEIGHTS__INIT;
    w.version = c->s.version;
    w.wait = reply == REPLY_WAIT;
    w.stop = reply == REPLY_STOP || m->drain;
    w.redo = reply == REPLY_REDO;
    w.duplicate = reply == REPLY_DROPPED;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_WEIGHTS;
    env.weights = &w;
    kd_wire_tensor_t t;
    int n_tensors = 0;
    if (!w.wait && !w.stop) {
        release_slot(c, m);
        int slot = m->shm_active ? current_slot(c) : -1;
        if (slot >= 0) {
            c->slot_readers[slot]++;
            m->held_slot = w.shared_slot = (uint32_t)slot + 1;
        } else {
            t = weights_tensor(c);
            n_tensors = 1;
        }
    }
    send_to(c, m, &env, &t, n_tensors);
    m->state = w.wait ? WORKER_HELD : WORKER_COMPUTING;
}

static void send_refused(coord_t *c, const uint8_t *rid, size_t len, Kdist__RefusalCode code,
                         const char *reason) {
    kd_wire_send_refused(c->router, rid, len, code, reason);
}

static void send_control(coord_t *c, member_t *m, Kdist__Control__Kind kind) {
    Kdist__Control ctl = KDIST__CONTROL__INIT;
    ctl.kind = kind;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
    env.control = &ctl;
    send_to(c, m, &env, NULL, 0);
}

/* ---- the epoch, the ledger and the assignment --------------------------------------------- */

static int teacher_order(const void *a, const void *b) {
    const member_t *x = *(member_t *const *)a, *y = *(member_t *const *)b;
    return strcmp(x->node_id, y->node_id);
}

/* Sends every live teacher its share (b % T) of the given batches of the current epoch. */
static void assign_batches(coord_t *c, const uint32_t *ids, size_t n, bool restream) {
    member_t *teachers[COORD_MAX_MEMBERS];
    int T = 0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (c->members[i].used && c->members[i].role == KDIST__ROLE__TEACHER)
            teachers[T++] = &c->members[i];
    if (T == 0 || n == 0) return;
    qsort(teachers, (size_t)T, sizeof teachers[0], teacher_order);
    uint32_t *share = kd_xmalloc(n * sizeof *share);
    for (int t = 0; t < T; t++) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if ((int)(ids[i] % (uint32_t)T) == t) {
                share[k++] = ids[i];
                c->owner[ids[i]] = (int)(teachers[t] - c->members);
            }
        Kdist__Assign a = KDIST__ASSIGN__INIT;
        a.epoch = c->s.epoch;
        a.seed = (uint64_t)c->r.seed;
        a.batch_size = (uint32_t)c->r.train.batch_size;
        a.n_batch_ids = k;
        a.batch_ids = share;
        a.restream = restream;
        kd_env_t env = KDIST__ENVELOPE__INIT;
        env.body_case = KDIST__ENVELOPE__BODY_ASSIGN;
        env.assign = &a;
        if (k || !restream) send_to(c, teachers[t], &env, NULL, 0);
    }
    free(share);
}

/* The batches of this epoch that are neither applied nor collected in the open step. */
static size_t unapplied_batches(coord_t *c, uint32_t *out) {
    size_t k = 0;
    for (size_t b = 0; b < c->n_batches; b++)
        if (!c->applied[b] && !c->in_step[b]) out[k++] = (uint32_t)b;
    return k;
}

static void assign_epoch(coord_t *c) {
    if (live_count(c, KDIST__ROLE__TEACHER) == 0) return; /* the first teacher's Hello assigns */
    uint32_t *ids = kd_xmalloc((c->n_batches ? c->n_batches : 1) * sizeof *ids);
    size_t n = unapplied_batches(c, ids);
    assign_batches(c, ids, n, false);
    free(ids);
    c->assigned = true;
    c->assign_at = 0;
    c->last_progress = kd_now();
    kd_log(KD_LOG_INFO, "COORD-EPOCH", "epoch %u: %zu batches to %d teacher node(s)", c->s.epoch, n,
           live_count(c, KDIST__ROLE__TEACHER));
}

static void start_epoch(coord_t *c, uint32_t epoch) {
    c->s.epoch = epoch;
    memset(c->applied, 0, c->n_batches);
    memset(c->in_step, 0, c->n_batches);
    memset(c->nacked, 0, c->n_batches * sizeof *c->nacked);
    c->applied_count = 0;
    c->s.batches_expected += (long)c->n_batches;
    c->assigned = false;
    assign_epoch(c);
}

/* A teacher node is gone: the batches of this epoch it held and that are not applied go to the
 * live ones at once (those it streamed before it died may still come back: the ledger drops
 * the second copy). With no teacher left, the next one to say hello gets the whole rest. */
static void reassign_share(coord_t *c, const member_t *gone) {
    if (!c->assigned) return;
    const int index = (int)(gone - c->members);
    uint32_t *ids = kd_xmalloc((c->n_batches ? c->n_batches : 1) * sizeof *ids);
    size_t n = 0;
    for (size_t b = 0; b < c->n_batches; b++)
        if (c->owner[b] == index && !c->applied[b] && !c->in_step[b]) ids[n++] = (uint32_t)b;
    if (live_count(c, KDIST__ROLE__TEACHER) == 0) {
        c->assigned = false;
        kd_log(KD_LOG_WARN, "COORD-NO-TEACHER",
               "no teacher node left: epoch %u waits for one to join", c->s.epoch);
    } else if (n) {
        assign_batches(c, ids, n, true);
        kd_log(KD_LOG_INFO, "COORD-REASSIGN",
               "teacher %s is gone: its %zu unapplied batch(es) of epoch %u go to %d live "
               "teacher node(s)",
               gone->node_id, n, c->s.epoch, live_count(c, KDIST__ROLE__TEACHER));
    }
    free(ids);
}

/* Asks the teachers for every unapplied batch of the epoch again. A teacher streams the ones
 * still in its queue once (it merges the lists); the ones streamed but not pushed back come
 * again, and if the first copy was only late the ledger drops the second. */
static void restream_unapplied(coord_t *c, const char *why) {
    if (c->phase != RUN_RUNNING || !c->assigned) return;
    uint32_t *ids = kd_xmalloc((c->n_batches ? c->n_batches : 1) * sizeof *ids);
    size_t n = unapplied_batches(c, ids);
    if (n) {
        kd_log(KD_LOG_WARN, "COORD-RESTREAM",
               "%s: asking for the %zu unapplied batch(es) of "
               "epoch %u again",
               why, n, c->s.epoch);
        assign_batches(c, ids, n, true);
        c->s.restreamed += (long)n;
    }
    free(ids);
    c->last_progress = kd_now();
}

/* Streamed batches that never came back: their worker died unseen, or a queue was lost. */
static void restream_stalled(coord_t *c) {
    if (kd_now() - c->last_progress < c->r.cluster.restream_timeout_ms / 1000.0) return;
    char why[96];
    snprintf(why, sizeof why, "no batch applied for %.1f s", kd_now() - c->last_progress);
    restream_unapplied(c, why);
}

/* ---- evaluation, metrics, checkpoints ---------------------------------------------------- */

static void flush_metrics(coord_t *c, long step) {
    char err[KD_ERR_LEN];
    if (kd_metrics_flush(c->metrics, step, err, sizeof err) != 0)
        kd_log(KD_LOG_ERROR, "COORD-METRICS", "%s", err);
}

static void request_eval(coord_t *c) {
    evaluator_request(c->eval, c->model->params, c->s.step);
    c->last_eval_step = c->s.step;
}

static void handle_eval_result(coord_t *c, const eval_result_t *res) {
    c->last_eval = *res;
    c->have_eval = true;
    c->s.best_val_accuracy = res->best_val_accuracy;
    c->s.best_step = res->best_step;
    c->s.evals_since_best = res->evals_since_best;
    kd_metrics_scalar(c->metrics, "eval/val_accuracy", res->val.accuracy);
    kd_metrics_scalar(c->metrics, "eval/val_loss", res->val.loss);
    kd_metrics_scalar(c->metrics, "eval/test_accuracy", res->test.accuracy);
    kd_metrics_scalar(c->metrics, "eval/test_loss", res->test.loss);
    if (!isnan(res->test.agreement)) {
        kd_metrics_scalar(c->metrics, "eval/val_teacher_agreement", res->val.agreement);
        kd_metrics_scalar(c->metrics, "eval/val_teacher_kl", res->val.teacher_kl);
        kd_metrics_scalar(c->metrics, "eval/test_teacher_agreement", res->test.agreement);
        kd_metrics_scalar(c->metrics, "eval/test_teacher_kl", res->test.teacher_kl);
    }
    flush_metrics(c, res->step);
    kd_log(KD_LOG_INFO, "COORD-EVAL", "step %ld: val accuracy %.4f (loss %.4f), test %.4f%s",
           res->step, res->val.accuracy, res->val.loss, res->test.accuracy,
           res->improved ? " (best)" : "");
    if (c->phase == RUN_RUNNING && c->r.eval.patience > 0 &&
        res->evals_since_best >= c->r.eval.patience) {
        kd_log(KD_LOG_INFO, "COORD-EARLY-STOP",
               "no validation improvement in %d evaluations: stopping (best step %ld)",
               res->evals_since_best, res->best_step);
        c->status = "early_stopped";
        c->phase = RUN_FINISHING;
    }
}

static void save_checkpoint(coord_t *c) {
    char err[KD_ERR_LEN];
    c->s.elapsed = elapsed(c);
    c->t0 = kd_now();
    if (c->weights_poisoned) return; /* the last finite checkpoint stays the newest */
    if (coord_checkpoint_save(c->ckpt_dir, &c->s, c->model, c->opt, c->applied, c->n_batches,
                              c->r.checkpoint.keep, err, sizeof err) != 0)
        kd_log(KD_LOG_ERROR, "COORD-CKPT-FAIL", "%s", err);
    c->last_ckpt_step = c->s.step;
}

static void write_metrics(coord_t *c) {
    double now = kd_now(), dt = now - c->win_t0;
    if (c->win_pushes == 0) return;
    kd_metrics_scalar(c->metrics, "train/loss", c->win_loss / (double)c->win_samples);
    kd_metrics_scalar(c->metrics, "train/accuracy",
                      (double)c->win_correct / (double)c->win_samples);
    kd_metrics_scalar(c->metrics, "train/lr", kd_schedule_lr(&c->sched, c->s.position));
    kd_metrics_scalar(c->metrics, "train/samples_per_sec", dt > 0 ? c->win_samples / dt : 0.0);
    kd_metrics_scalar(c->metrics, "cluster/workers", live_count(c, KDIST__ROLE__WORKER));
    kd_metrics_scalar(c->metrics, "cluster/teachers", live_count(c, KDIST__ROLE__TEACHER));
    kd_metrics_scalar(c->metrics, "cluster/staleness", c->win_staleness / (double)c->win_pushes);
    kd_metrics_scalar(c->metrics, "ledger/duplicates_dropped", (double)c->s.duplicates);
    kd_metrics_scalar(c->metrics, "ledger/restreamed", (double)c->s.restreamed);
    kd_metrics_scalar(c->metrics, "ledger/messages_dropped", (double)c->messages_dropped);
    kd_metrics_scalar(c->metrics, "ledger/connections_refused", (double)c->connections_refused);
    kd_metrics_scalar(c->metrics, "memory/coordinator", (double)kd_node_rss_bytes());
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (!m->used || m->role == KDIST__ROLE__CLIENT || !m->rss_bytes) continue;
        char tag[128];
        snprintf(tag, sizeof tag, "memory/%s-%s", role_name(m->role), m->node_id);
        kd_metrics_scalar(c->metrics, tag, (double)m->rss_bytes);
    }
    static const char *const phases[4] = {"wait_batch", "compute", "push", "wait_weights"};
    for (int p = 0; p < 4; p++) {
        char tag[64];
        snprintf(tag, sizeof tag, "time/phase/%s", phases[p]);
        kd_metrics_scalar(c->metrics, tag, c->win_phase[p] / (double)c->win_pushes);
    }
    for (int l = 0; l < c->model->n_layers; l++) {
        char tag[96];
        const char *kind = kd_layer_kind_name(c->model->layers[l].spec.kind);
        snprintf(tag, sizeof tag, "time/layer%d_%s/forward", l, kind);
        kd_metrics_scalar(c->metrics, tag, c->win_layer_fwd[l] / (double)c->win_pushes);
        snprintf(tag, sizeof tag, "time/layer%d_%s/backward", l, kind);
        kd_metrics_scalar(c->metrics, tag, c->win_layer_bwd[l] / (double)c->win_pushes);
    }
    flush_metrics(c, c->s.step);
    c->win_t0 = now;
    c->win_loss = c->win_staleness = 0;
    c->win_samples = c->win_correct = c->win_pushes = c->win_steps = 0;
    memset(c->win_phase, 0, sizeof c->win_phase);
    memset(c->win_layer_fwd, 0, sizeof(double) * (size_t)c->model->n_layers);
    memset(c->win_layer_bwd, 0, sizeof(double) * (size_t)c->model->n_layers);
}

static void finish(coord_t *c, const char *status) {
    if (c->phase == RUN_FINISHING) return;
    c->status = status;
    c->phase = RUN_FINISHING;
}

/* The run cannot go on: it ends "failed" with the reason in the log and summary.json. */
static void fail_run(coord_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail_run(coord_t *c, const char *fmt, ...) {
    if (c->fail_reason[0]) return; /* the first cause is the one to fix */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->fail_reason, sizeof c->fail_reason, fmt, ap);
    va_end(ap);
    kd_log(KD_LOG_ERROR, "COORD-RUN-FAILED", "%s", c->fail_reason);
    c->status = "failed";
    c->phase = RUN_FINISHING;
}

/* After every optimizer step: periodic work and the end of the epoch or run. */
static void after_step(coord_t *c) {
    c->win_steps++;
    if (c->win_steps >= c->r.logging.every_steps) write_metrics(c);
    if (c->r.eval.every_steps > 0 && c->s.step % c->r.eval.every_steps == 0) request_eval(c);
    if (c->r.checkpoint.every_steps > 0 && c->s.step % c->r.checkpoint.every_steps == 0)
        save_checkpoint(c);
    if (c->r.train.max_steps > 0 && c->s.step >= c->r.train.max_steps) {
        finish(c, "completed");
        return;
    }
    if (c->applied_count < c->n_batches) return;
    kd_log(KD_LOG_INFO, "COORD-EPOCH-DONE", "epoch %u complete: %zu/%zu batches applied once",
           c->s.epoch, c->applied_count, c->n_batches);
    if (c->r.eval.every_steps == 0) request_eval(c);
    if (c->s.epoch + 1 >= (uint32_t)c->r.train.epochs) {
        finish(c, "completed");
        return;
    }
    start_epoch(c, c->s.epoch + 1);
}

/* ---- applying gradients ------------------------------------------------------------------ */

static void apply_gradient(coord_t *c, float *grad, long batches, long samples) {
    kd_optim_step(c->opt, c->model->params, grad, kd_schedule_lr(&c->sched, c->s.position));
    size_t bad = kd_first_nonfinite(c->model->params, c->model->n_params);
    if (bad < c->model->n_params) {
        c->weights_poisoned = true;
        fail_run(c,
                 "the weights became non-finite at step %ld (parameter %zu is %g) from finite "
                 "gradients: the update overflowed; try a lower optim.lr. The weights are not "
                 "saved; the last checkpoint and best/ hold the last finite ones",
                 c->s.step + 1, bad, (double)c->model->params[bad]);
    }
    c->s.position += batches;
    c->s.step++;
    c->s.version++;
    invalidate_weights(c);
    c->last_progress = c->last_apply = kd_now();
    c->samples_applied += samples;
}

/* Samples per second of training, from the first push to the last update. */
static double train_rate(coord_t *c) {
    double dt = c->last_apply - c->first_push;
    return c->first_push > 0 && dt > 0 ? (double)c->samples_applied / dt : 0.0;
}

static void mark_applied(coord_t *c, const Kdist__BatchRef *ref) {
    c->applied[ref->batch_id] = 1;
    c->in_step[ref->batch_id] = 0;
    c->applied_count++;
    c->s.batches_applied++;
}

/* Accounts a push's statistics into the metrics window and the worker's rate. */
static void account_push(coord_t *c, member_t *m, const Kdist__PushGradient *p) {
    c->win_loss += p->loss_sum;
    c->win_samples += p->samples;
    c->win_correct += p->correct;
    c->win_pushes++;
    c->win_staleness += (double)(c->s.version - p->base_version);
    for (size_t i = 0; i < p->n_phase_seconds && i < 4; i++) c->win_phase[i] += p->phase_seconds[i];
    for (size_t i = 0; i < p->n_layer_forward_seconds && (int)i < c->model->n_layers; i++)
        c->win_layer_fwd[i] += p->layer_forward_seconds[i];
    for (size_t i = 0; i < p->n_layer_backward_seconds && (int)i < c->model->n_layers; i++)
        c->win_layer_bwd[i] += p->layer_backward_seconds[i];
    m->steps++;
    m->samples += p->samples;
    m->rate_samples += p->samples;
    double now = kd_now();
    if (now - m->rate_t0 >= 1.0) {
        m->samples_per_sec = m->rate_samples / (now - m->rate_t0);
        m->rate_t0 = now;
        m->rate_samples = 0;
    }
    if (p->rss_bytes) m->rss_bytes = p->rss_bytes;
}

static bool sync_step_ready(coord_t *c) {
    if (c->step_count == 0) return false;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (!m->used || m->role != KDIST__ROLE__WORKER) continue;
        if (m->state != WORKER_PUSHED && !m->waiting_for_batch) return false;
    }
    return true;
}

/* Closes the open sync step: one update from the samples-weighted mean of its gradients. */
static void close_sync_step(coord_t *c) {
    const size_t n = c->model->n_params;
    float *grad;
    if (c->step_count == 1) {
        grad = c->step_grads[0];
    } else {
        double total = 0;
        for (int k = 0; k < c->step_count; k++) total += c->step_msgs[k].env->push->samples;
        KD_ASSERT(total > 0);
        memset(c->step_grad, 0, n * sizeof(float));
        for (int k = 0; k < c->step_count; k++) {
            const float *g = c->step_grads[k];
            float w = (float)(c->step_msgs[k].env->push->samples / total);
            for (size_t i = 0; i < n; i++) c->step_grad[i] += w * g[i];
        }
        grad = c->step_grad;
    }
    long samples = 0;
    for (int k = 0; k < c->step_count; k++) samples += c->step_msgs[k].env->push->samples;
    apply_gradient(c, grad, c->step_count, samples);
    for (int k = 0; k < c->step_count; k++) {
        mark_applied(c, c->step_msgs[k].env->push->ref);
        kd_msg_close(&c->step_msgs[k]);
        free(c->step_copies[k]);
        c->step_copies[k] = NULL;
    }
    int count = c->step_count;
    c->step_count = 0;
    for (int k = 0; k < count; k++) {
        member_t *m = &c->members[c->step_member[k]];
        if (m->used && m->state == WORKER_PUSHED) send_weights(c, m, go_on(c));
    }
    after_step(c);
    /* the end of the run is known only now: tell the collected workers */
    if (c->phase == RUN_FINISHING)
        for (int k = 0; k < count; k++) {
            member_t *m = &c->members[c->step_member[k]];
            if (m->used && m->state == WORKER_COMPUTING) send_weights(c, m, REPLY_STOP);
        }
}

/* SSP: a worker may go on while it is at most `staleness` clocks ahead of the slowest. */
static uint64_t min_clock(coord_t *c) {
    uint64_t lo = UINT64_MAX;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (m->used && m->role == KDIST__ROLE__WORKER && !m->waiting_for_batch && m->clock < lo)
            lo = m->clock;
    }
    return lo;
}

static void release_held_workers(coord_t *c) {
    uint64_t lo = min_clock(c);
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (m->used && m->role == KDIST__ROLE__WORKER && m->state == WORKER_HELD &&
            (lo == UINT64_MAX || m->clock <= lo + (uint64_t)c->r.cluster.staleness))
            send_weights(c, m, go_on(c));
    }
}

/* Why a gradient must not reach the optimizer (true, with why set): a non-finite loss or value,
 * or a norm beyond cluster.max_gradient_norm. One pass in double, so huge values do not
 * overflow the sum. */
static bool gradient_problem(coord_t *c, const float *grad, const Kdist__PushGradient *p, char *why,
                             size_t whylen) {
    if (!isfinite(p->loss_sum)) {
        kd_err(why, whylen, "its loss is %g", p->loss_sum);
        return true;
    }
    double sum = 0;
    for (size_t i = 0; i < c->model->n_params; i++) sum += (double)grad[i] * (double)grad[i];
    if (!isfinite(sum)) {
        size_t bad = kd_first_nonfinite(grad, c->model->n_params);
        kd_err(why, whylen, "gradient value %zu is %g", bad,
               bad < c->model->n_params ? (double)grad[bad] : sum);
        return true;
    }
    const double bound = c->r.cluster.max_gradient_norm;
    if (bound > 0 && sqrt(sum) > bound) {
        kd_err(why, whylen, "its norm %.4g exceeds cluster.max_gradient_norm %.4g", sqrt(sum),
               bound);
        return true;
    }
    return false;
}

/* The batch of a rejected or refused push goes back to its teacher (it was never applied). */
static void requeue_batch(coord_t *c, const Kdist__BatchRef *ref) {
    if (c->phase != RUN_RUNNING || !c->assigned || !ref || ref->epoch != c->s.epoch ||
        ref->batch_id >= c->n_batches || c->applied[ref->batch_id] || c->in_step[ref->batch_id])
        return;
    uint32_t id = ref->batch_id;
    assign_batches(c, &id, 1, true);
    c->s.restreamed++;
}

static void remove_member(coord_t *c, member_t *m, const char *event);

/* A member that keeps sending unusable gradients while others' are applied is removed and may
 * not come back under its key. */
static void evict_member(coord_t *c, member_t *m, const char *why) {
    c->evicted++;
    kd_log(KD_LOG_WARN, "COORD-EVICT",
           "%s %s (%s) evicted: %ld gradients in a row rejected, the "
           "last because %s",
           role_name(m->role), m->node_id, m->host, m->rejected_in_a_row, why);
    if (m->curve_key[0] &&
        c->n_evicted_keys < (int)(sizeof c->evicted_keys / sizeof c->evicted_keys[0]))
        snprintf(c->evicted_keys[c->n_evicted_keys++], sizeof c->evicted_keys[0], "%s",
                 m->curve_key);
    char reason[KD_ERR_LEN + 64];
    snprintf(reason, sizeof reason, "evicted: its gradients were rejected (%s)", why);
    send_refused(c, m->rid, m->rid_len, KDIST__REFUSAL_CODE__EVICTED, reason);
    remove_member(c, m, "evicted");
}

/* A gradient collected into a sync step or applied: the rejection streaks end. */
static void accept_push(coord_t *c, member_t *m) {
    c->pushes_accepted++;
    c->rejected_in_a_row = 0;
    m->rejected_in_a_row = 0;
}

/* A gradient that failed gradient_problem: counted, never applied; its batch goes back to the
 * queue. A member whose streak goes on while others' gradients are applied is evicted; a
 * streak across the whole cluster (training diverged) fails the run. */
static void reject_push(coord_t *c, member_t *m, const Kdist__BatchRef *ref, const char *why) {
    c->gradients_rejected++;
    c->rejected_in_a_row++;
    if (m->rejected_in_a_row++ == 0) m->accepted_at_first_rejection = c->pushes_accepted;
    if (kd_log_allow(&c->drop_limit, 1.0))
        kd_log(KD_LOG_WARN, "COORD-GRADIENT-REJECTED",
               "gradient of batch %u/%u from %s %s rejected: %s (%ld rejected so far)", ref->epoch,
               ref->batch_id, role_name(m->role), m->node_id, why, c->gradients_rejected);
    requeue_batch(c, ref);
    if (c->rejected_in_a_row >= c->r.cluster.fail_after) {
        send_weights(c, m, REPLY_DROPPED);
        fail_run(c,
                 "the last %ld gradients pushed were all rejected (the last because %s): the "
                 "training diverged or every worker is broken; try a lower optim.lr or "
                 "optim.clip_norm",
                 c->rejected_in_a_row, why);
        return;
    }
    if (m->rejected_in_a_row >= c->r.cluster.evict_after &&
        c->pushes_accepted > m->accepted_at_first_rejection) {
        evict_member(c, m, why);
        return;
    }
    send_weights(c, m, REPLY_DROPPED);
}

static const char *nack_reason_name(Kdist__NackReason r) {
    switch (r) {
    case KDIST__NACK_REASON__NACK_TEACHER_LOGITS:
        return "its teacher logits";
    case KDIST__NACK_REASON__NACK_LABELS:
        return "its labels";
    case KDIST__NACK_REASON__NACK_INPUTS:
        return "its inputs";
    default:
        return "it";
    }
}

/* A worker could not use a batch: it goes back to its teacher, a bounded number of times. */
static void on_nack(coord_t *c, member_t *m, kd_msg_t *msg) {
    const Kdist__Nack *n = msg->env->nack;
    const Kdist__BatchRef *ref = n->ref;
    if (!ref || ref->batch_id >= c->n_batches) {
        drop(c, msg, "nack for a batch that does not exist");
        return;
    }
    c->nacks++;
    const char *detail = n->detail && n->detail[0] ? n->detail : "no detail";
    if (ref->epoch != c->s.epoch || c->applied[ref->batch_id] || c->phase != RUN_RUNNING) return;
    uint32_t times = ++c->nacked[ref->batch_id];
    kd_log(KD_LOG_WARN, "COORD-NACK", "worker %s cannot use batch %u/%u (%s: %s): time %u of %ld",
           m->node_id, ref->epoch, ref->batch_id, nack_reason_name(n->reason), detail, times,
           c->r.cluster.max_nacks);
    if ((long)times >= c->r.cluster.max_nacks) {
        fail_run(c,
                 "batch %u/%u was refused %u times by workers because of %s (%s): fix the data or "
                 "the teacher, or raise cluster.max_nacks",
                 ref->epoch, ref->batch_id, times, nack_reason_name(n->reason), detail);
        return;
    }
    requeue_batch(c, ref);
}

static void on_push(coord_t *c, member_t *m, kd_msg_t *msg) {
    const Kdist__PushGradient *p = msg->env->push;
    char err[KD_ERR_LEN];
    note_weights_held(c, m, p->base_version);
    float *grad = p->ref ? push_gradient(c, m, msg, err, sizeof err) : NULL;
    if (!grad) {
        drop(c, msg, p->ref ? err : "push without a batch reference");
        send_weights(c, m, REPLY_DROPPED); /* a member is never left without an answer */
        return;
    }
    if (p->samples == 0 || p->samples > (uint32_t)c->r.train.batch_size ||
        p->correct > p->samples) {
        drop(c, msg, "push with impossible counters");
        send_weights(c, m, REPLY_DROPPED); /* a member is never left without an answer */
        return;
    }
    m->waiting_for_batch = false;
    if (c->phase == RUN_FINISHING) {
        send_weights(c, m, REPLY_STOP);
        return;
    }
    if (gradient_problem(c, grad, p, err, sizeof err)) {
        reject_push(c, m, p->ref, err);
        return;
    }
    if (c->first_push == 0) c->first_push = kd_now();
    const Kdist__BatchRef *ref = p->ref;
    bool past = ref->epoch < c->s.epoch;
    if (ref->batch_id >= c->n_batches || ref->epoch >= (uint32_t)c->r.train.epochs) {
        drop(c, msg, "push for a batch that does not exist");
        send_weights(c, m, REPLY_DROPPED);
        return;
    }
    /* Computed on weights or batches this coordinator never handed out — the worker was
     * ahead of the checkpoint a restarted coordinator resumed from: dropped, not counted;
     * the batch comes again when its epoch does. */
    if (ref->epoch > c->s.epoch || p->base_version > c->s.version) {
        c->stale_dropped++;
        send_weights(c, m, REPLY_DROPPED);
        return;
    }
    if (past || c->applied[ref->batch_id] || c->in_step[ref->batch_id]) {
        c->s.duplicates++;
        kd_log(KD_LOG_INFO, "COORD-DUPLICATE", "batch %u/%u from %s-%s already counted: dropped",
               ref->epoch, ref->batch_id, role_name(m->role), m->node_id);
        send_weights(c, m, REPLY_DROPPED);
        return;
    }
    switch (c->r.cluster.consistency) {
    case KD_CONSISTENCY_SYNC:
        if (m->state == WORKER_PUSHED) { /* one batch per worker per step: it awaits the close */
            drop(c, msg, "a second push in one sync step");
            return;
        }
        if (p->base_version < c->s.version) { /* its step closed without it: same batch again */
            send_weights(c, m, REPLY_REDO);
            return;
        }
        if (c->step_count == COORD_MAX_MEMBERS) close_sync_step(c); /* churn cannot overflow it */
        accept_push(c, m);
        account_push(c, m, p);
        c->in_step[ref->batch_id] = 1;
        c->step_member[c->step_count] = (int)(m - c->members);
        c->step_grads[c->step_count] = grad;
        kd_msg_move(&c->step_msgs[c->step_count++], msg); /* the step owns it now */
        m->state = WORKER_PUSHED;
        m->clock++;
        if (sync_step_ready(c)) close_sync_step(c);
        return;
    case KD_CONSISTENCY_ASYNC:
    case KD_CONSISTENCY_SSP:
        accept_push(c, m);
        account_push(c, m, p);
        apply_gradient(c, grad, 1, p->samples);
        mark_applied(c, ref);
        m->clock++;
        bool hold = c->r.cluster.consistency == KD_CONSISTENCY_SSP && min_clock(c) != UINT64_MAX &&
                    m->clock > min_clock(c) + (uint64_t)c->r.cluster.staleness;
        send_weights(c, m, hold ? REPLY_WAIT : REPLY_WEIGHTS);
        after_step(c);
        if (c->r.cluster.consistency == KD_CONSISTENCY_SSP) release_held_workers(c);
        if (c->phase == RUN_FINISHING && m->state == WORKER_COMPUTING)
            send_weights(c, m, REPLY_STOP);
        return;
    }
}

/* ---- membership -------------------------------------------------------------------------- */

/* The stream endpoints of the live teacher nodes and, under CurveZMQ, their public keys
 * (borrowed strings; keys may be NULL); returns the count. */
static size_t teacher_endpoints(coord_t *c, char **out, char **keys) {
    size_t n = 0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (c->members[i].used && c->members[i].role == KDIST__ROLE__TEACHER) {
            if (keys) keys[n] = c->members[i].curve_key;
            out[n++] = c->members[i].stream_endpoint;
        }
    return n;
}

static void send_welcome(coord_t *c, member_t *m) {
    char spec[2048];
    kd_model_describe(c->model, spec, sizeof spec);
    char *yaml = kd_recipe_to_yaml(&c->r);
    char *endpoints[COORD_MAX_MEMBERS], *keys[COORD_MAX_MEMBERS];
    size_t n_endpoints = teacher_endpoints(c, endpoints, keys);
    Kdist__Shape shape = KDIST__SHAPE__INIT;
    shape.c = c->model->input.c;
    shape.h = c->model->input.h;
    shape.w = c->model->input.w;
    Kdist__Welcome w = KDIST__WELCOME__INIT;
    w.run_id = c->s.run_id;
    w.recipe_yaml = yaml;
    w.model_spec = spec;
    w.input = &shape;
    w.num_classes = (uint32_t)c->model->num_classes;
    w.weights_version = c->s.version;
    w.n_teacher_endpoints = n_endpoints;
    w.teacher_endpoints = endpoints;
    if (c->r.cluster.security.curve) {
        w.n_teacher_keys = n_endpoints;
        w.teacher_keys = keys;
    }
    w.heartbeat_ms = (uint32_t)c->r.cluster.heartbeat_ms;
    w.n_params = c->model->n_params;
    Kdist__SharedMemory offer = KDIST__SHARED_MEMORY__INIT;
    if (offer_shared_memory(c, m, &offer)) w.shared_memory = &offer;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_WELCOME;
    env.welcome = &w;
    kd_wire_tensor_t t = weights_tensor(c);
    send_to(c, m, &env, &t, m->role == KDIST__ROLE__WORKER ? 1 : 0);
    free(yaml);
}

static void send_peers(coord_t *c) {
    char *endpoints[COORD_MAX_MEMBERS], *keys[COORD_MAX_MEMBERS];
    size_t n = teacher_endpoints(c, endpoints, keys);
    Kdist__Peers p = KDIST__PEERS__INIT;
    p.n_teacher_endpoints = n;
    p.teacher_endpoints = endpoints;
    if (c->r.cluster.security.curve) {
        p.n_teacher_keys = n;
        p.teacher_keys = keys;
    }
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_PEERS;
    env.peers = &p;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (c->members[i].used && c->members[i].role == KDIST__ROLE__WORKER)
            send_to(c, &c->members[i], &env, NULL, 0);
}

static void remove_member(coord_t *c, member_t *m, const char *event) {
    kd_log(KD_LOG_INFO, "COORD-MEMBER-GONE", "%s %s (%s) %s", role_name(m->role), m->node_id,
           m->host, event);
    if (m->role != KDIST__ROLE__CLIENT) add_event(c, event, role_name(m->role), m->node_id);
    if (m->role != KDIST__ROLE__CLIENT &&
        (strcmp(event, "dead") == 0 || strcmp(event, "evicted") == 0) &&
        c->n_lost++ < COORD_MAX_LOST)
        c->lost[c->n_lost - 1] = c->events[c->n_events - 1];
    /* a sync step never waits for a worker that is gone; its collected gradient still counts */
    keep_step_gradients(c, m);
    release_slot(c, m);
    kd_shm_close(&m->grad_shm);
    if (m->role == KDIST__ROLE__TEACHER) add_teacher_counters(&c->teachers_gone, m);
    m->used = false;
    if (c->phase != RUN_RUNNING) return;
    if (m->role == KDIST__ROLE__WORKER) {
        if (c->r.cluster.consistency == KD_CONSISTENCY_SYNC && sync_step_ready(c))
            close_sync_step(c);
        if (c->r.cluster.consistency == KD_CONSISTENCY_SSP) release_held_workers(c);
        /* the batch in its hands and those queued in its socket are gone with it */
        char why[160];
        snprintf(why, sizeof why, "worker %s %s", m->node_id,
                 strcmp(event, "dead") == 0 ? "died" : "left");
        restream_unapplied(c, why);
    } else if (m->role == KDIST__ROLE__TEACHER) {
        reassign_share(c, m);
        send_peers(c);
    }
}

static void on_hello(coord_t *c, kd_msg_t *msg) {
    const Kdist__Hello *h = msg->env->hello;
    if (h->role != KDIST__ROLE__WORKER && h->role != KDIST__ROLE__TEACHER) {
        send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__BAD_HELLO,
                     "only workers and teacher nodes say hello");
        drop(c, msg, "hello from an unexpected role");
        return;
    }
    if (h->run_id[0] && strcmp(h->run_id, c->s.run_id) != 0) {
        char reason[256];
        snprintf(reason, sizeof reason, "this coordinator runs '%s', not '%s'", c->s.run_id,
                 h->run_id);
        send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__WRONG_RUN, reason);
        return;
    }
    if (!h->node_id[0] || strlen(h->node_id) >= sizeof c->members[0].node_id ||
        (h->role == KDIST__ROLE__TEACHER &&
         (!h->stream_endpoint[0] || strlen(h->stream_endpoint) >= 256))) {
        send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__BAD_HELLO,
                     "hello needs a node id (and a teacher endpoint)");
        drop(c, msg, "hello with a missing or oversized field");
        return;
    }
    if (c->curve && !kd_curve_role_has(&c->keys, KD_CURVE_MEMBER, msg->user_id) &&
        !kd_curve_role_has(&c->keys,
                           h->role == KDIST__ROLE__WORKER ? KD_CURVE_WORKER : KD_CURVE_TEACHER,
                           msg->user_id)) {
        char reason[256];
        snprintf(reason, sizeof reason,
                 "key %s may not join as a %s: list it in cluster.security.%s or authorized_keys",
                 msg->user_id, role_name(h->role),
                 h->role == KDIST__ROLE__WORKER ? "worker_keys" : "teacher_keys");
        send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__NOT_AUTHORIZED, reason);
        c->hellos_refused++;
        drop(c, msg, "hello from a key without that role");
        return;
    }
    for (int i = 0; i < c->n_evicted_keys; i++)
        if (msg->user_id[0] && strcmp(c->evicted_keys[i], msg->user_id) == 0) {
            send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__EVICTED,
                         "this key was evicted from the run");
            drop(c, msg, "hello from an evicted key");
            return;
        }
    if (c->phase != RUN_RUNNING) {
        send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__RUN_FINISHING,
                     "the run is finishing");
        return;
    }
    /* A node id belongs to one live connection. A second Hello for it replaces the holder only
     * when the holder's connection is gone (a killed node's socket closes at once, and libzmq
     * then refuses to route to it); a live holder keeps its place and the newcomer is refused,
     * so nobody can evict a member by claiming its id. The holder's own re-Hello is a restart. */
    bool restart = false;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *old = &c->members[i];
        if (!old->used || old->role != h->role || strcmp(old->node_id, h->node_id) != 0) continue;
        bool same_connection =
            old->rid_len == msg->peer_len && memcmp(old->rid, msg->peer, msg->peer_len) == 0;
        if (!same_connection && member_reachable(c, old)) {
            char reason[160];
            snprintf(reason, sizeof reason, "%s %s is live on another connection",
                     role_name(h->role), h->node_id);
            send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__ID_IN_USE, reason);
            c->hellos_refused++;
            return;
        }
        remove_member(c, old, "restart");
        restart = true;
    }
    member_t *m = find_member(c, msg->peer, msg->peer_len);
    if (m) remove_member(c, m, "restart");
    for (int i = 0; i < COORD_MAX_MEMBERS && !m; i++)
        if (!c->members[i].used) m = &c->members[i];
    if (!m) {
        send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__TOO_MANY_MEMBERS,
                     "too many members");
        return;
    }
    memset(m, 0, sizeof *m);
    m->used = true;
    m->role = h->role;
    snprintf(m->node_id, sizeof m->node_id, "%s", h->node_id);
    m->incarnation = h->incarnation;
    memcpy(m->rid, msg->peer, msg->peer_len);
    m->rid_len = msg->peer_len;
    snprintf(m->host, sizeof m->host, "%s", h->host);
    m->pid = h->pid;
    m->threads = h->threads;
    snprintf(m->stream_endpoint, sizeof m->stream_endpoint, "%s", h->stream_endpoint);
    /* the key the ZAP handler checked, never one the node claims: workers trust it */
    snprintf(m->curve_key, sizeof m->curve_key, "%s", msg->user_id);
    m->joined = m->last_seen = m->rate_t0 = kd_now();
    m->state = WORKER_COMPUTING;
    uint64_t lo = min_clock(c);
    m->clock = lo == UINT64_MAX ? 0 : lo;
    kd_log(KD_LOG_INFO, "COORD-MEMBER-JOIN", "%s %s joined from %s (pid %u, incarnation %llu)",
           role_name(m->role), m->node_id, m->host, m->pid, (unsigned long long)m->incarnation);
    if (!restart) /* a restart was recorded as the old one left */
        add_event(c, "join", role_name(m->role), m->node_id);
    send_welcome(c, m);
    if (m->role == KDIST__ROLE__WORKER) {
        int w = live_count(c, KDIST__ROLE__WORKER);
        if (w > c->workers_max) c->workers_max = w;
    } else {
        send_peers(c);
        /* The first Assign waits (briefly) for the recipe's teacher nodes, so nodes started
         * together share the epoch instead of the first one taking it all. */
        if (!c->assigned && live_count(c, KDIST__ROLE__TEACHER) >= c->r.cluster.teachers)
            assign_epoch(c);
        else if (!c->assigned && c->assign_at == 0)
            c->assign_at = kd_now() + TEACHER_GATHER_SECONDS;
    }
}

static void on_heartbeat(coord_t *c, member_t *m, const Kdist__Heartbeat *hb) {
    if (hb->rss_bytes) m->rss_bytes = hb->rss_bytes;
    m->messages_dropped = hb->messages_dropped;
    m->connections_refused = hb->connections_refused;
    if (hb->teacher) {
        m->forward_samples = hb->teacher->forward_samples;
        m->cache_hits = hb->teacher->cache_hits;
        m->cache_misses = hb->teacher->cache_misses;
        m->cache_corrupt = hb->teacher->cache_corrupt;
        /* a teacher still filling its logit table is busy, not stalled: no restream yet */
        if (hb->teacher->filling) c->last_progress = kd_now();
    }
    m->batches_streamed = hb->batches_streamed;
    if (m->role != KDIST__ROLE__WORKER) return;
    bool was_idle = m->waiting_for_batch;
    m->waiting_for_batch = hb->waiting_for_batch && m->state == WORKER_COMPUTING;
    if (m->waiting_for_batch && !was_idle) {
        if (c->r.cluster.consistency == KD_CONSISTENCY_SYNC && sync_step_ready(c))
            close_sync_step(c);
        if (c->r.cluster.consistency == KD_CONSISTENCY_SSP) release_held_workers(c);
    }
}

/* ---- status ------------------------------------------------------------------------------ */

/* The teacher nodes' logit work over the run: forward passes and cache blocks. */
static json_t *teacher_work_json(coord_t *c) {
    member_t sum = c->teachers_gone;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (c->members[i].used && c->members[i].role == KDIST__ROLE__TEACHER)
            add_teacher_counters(&sum, &c->members[i]);
    return json_pack("{s:I, s:I, s:I, s:I}", "forward_samples", (json_int_t)sum.forward_samples,
                     "cache_hits", (json_int_t)sum.cache_hits, "cache_misses",
                     (json_int_t)sum.cache_misses, "cache_corrupt", (json_int_t)sum.cache_corrupt);
}

static json_t *status_json(coord_t *c) {
    double t = elapsed(c);
    long total = kd_train_total_steps(&c->r, c->data.train->n);
    double done = total > 0 ? (double)c->s.position / (double)total : 0.0;
    double rate = train_rate(c);
    json_t *j = json_pack(
        "{s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:o, s:o, s:o}",
        "run_id", c->s.run_id, "name", c->r.name, "status",
        c->phase == RUN_RUNNING ? "running" : (c->status ? c->status : "finishing"), "epoch",
        (json_int_t)c->s.epoch, "epochs", (json_int_t)c->r.train.epochs, "step",
        (json_int_t)c->s.position, "total_steps", (json_int_t)total, "version",
        (json_int_t)c->s.version, "batches_applied", (json_int_t)c->s.batches_applied,
        "batches_expected", (json_int_t)c->s.batches_expected, "duplicates_dropped",
        (json_int_t)c->s.duplicates, "restreamed", (json_int_t)c->s.restreamed, "messages_dropped",
        (json_int_t)c->messages_dropped, "samples_per_sec", kd_json_number(rate), "elapsed",
        kd_json_number(t), "eta", kd_json_number(done > 0 ? t * (1.0 - done) / done : 0.0));
    /* step/total_steps count batches (the schedule's clock), so progress does not depend on
     * how many batches a sync step averages; updates counts optimizer steps. */
    json_object_set_new(j, "updates", json_integer(c->s.step));
    json_object_set_new(j, "stale_dropped", json_integer(c->stale_dropped));
    json_object_set_new(j, "connections_refused", json_integer(c->connections_refused));
    json_object_set_new(j, "teacher", teacher_work_json(c));
    json_object_set_new(j, "gradients_rejected", json_integer(c->gradients_rejected));
    json_object_set_new(j, "nacks", json_integer(c->nacks));
    json_object_set_new(j, "members_evicted", json_integer(c->evicted));
    json_object_set_new(j, "hellos_refused", json_integer(c->hellos_refused));
    json_object_set_new(j, "control_refused", json_integer(c->control_refused));
    if (c->fail_reason[0]) json_object_set_new(j, "error", json_string(c->fail_reason));
    json_object_set_new(j, "lr", kd_json_number(kd_schedule_lr(&c->sched, c->s.position)));
    if (c->win_samples) {
        json_object_set_new(j, "loss", kd_json_number(c->win_loss / (double)c->win_samples));
        json_object_set_new(j, "train_accuracy",
                            kd_json_number((double)c->win_correct / (double)c->win_samples));
    }
    if (c->have_eval) {
        json_object_set_new(j, "val_accuracy", kd_json_number(c->last_eval.val.accuracy));
        json_object_set_new(j, "test_accuracy", kd_json_number(c->last_eval.test.accuracy));
    }
    json_t *members = json_array();
    double now = kd_now();
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (!m->used || m->role == KDIST__ROLE__CLIENT) continue;
        const char *state = m->role == KDIST__ROLE__TEACHER ? "streaming"
                            : m->waiting_for_batch          ? "idle"
                            : m->state == WORKER_COMPUTING  ? "computing"
                                                            : "waiting";
        json_t *member = json_pack(
            "{s:s, s:s, s:I, s:s, s:i, s:o, s:I, s:o, s:s, s:I}", "role", role_name(m->role), "id",
            m->node_id, "incarnation", (json_int_t)m->incarnation, "host", m->host, "pid",
            (int)m->pid, "last_seen", kd_json_number(now - m->last_seen), "steps",
            (json_int_t)m->steps, "samples_per_sec", kd_json_number(m->samples_per_sec), "state",
            state, "rss_bytes", (json_int_t)m->rss_bytes);
        json_object_set_new(member, "messages_dropped",
                            json_integer((json_int_t)m->messages_dropped));
        json_object_set_new(member, "connections_refused",
                            json_integer((json_int_t)m->connections_refused));
        json_array_append_new(members, member);
    }
    json_object_set_new(j, "members", members);
    json_t *events = json_array();
    for (int i = 0; i < c->n_events; i++)
        json_array_append_new(events, json_pack("{s:o, s:s, s:s, s:s}", "time",
                                                kd_json_number(c->events[i].time), "event",
                                                c->events[i].event, "role", c->events[i].role, "id",
                                                c->events[i].id));
    json_object_set_new(j, "events", events);
    return j;
}

/* Where a control command came from: the local ipc channel (whoever can open the run's 0700
 * directory owns the run) or the network socket (then its key decides). */
typedef enum { FROM_LOCAL_CHANNEL, FROM_NETWORK } control_origin_t;

static const char *control_kind_name(Kdist__Control__Kind kind) {
    switch (kind) {
    case KDIST__CONTROL__KIND__STATUS:
        return "status";
    case KDIST__CONTROL__KIND__STOP:
        return "stop";
    case KDIST__CONTROL__KIND__DRAIN:
        return "drain";
    case KDIST__CONTROL__KIND__SCALE:
        return "scale";
    case KDIST__CONTROL__KIND__CHECKPOINT_NOW:
        return "checkpoint-now";
    default:
        return "unknown";
    }
}

/* Whether a command may be obeyed (DESIGN §10): anything over the local channel; over the
 * network, status from any admitted key (or from anyone in plaintext, which binds loopback
 * only), everything else only from an operator key. */
static bool control_allowed(coord_t *c, const kd_msg_t *msg, control_origin_t from) {
    if (from == FROM_LOCAL_CHANNEL) return true;
    if (msg->env->control->kind == KDIST__CONTROL__KIND__STATUS) return true;
    return c->curve && kd_curve_role_has(&c->keys, KD_CURVE_OPERATOR, msg->user_id);
}

static void on_control(coord_t *c, kd_msg_t *msg, control_origin_t from) {
    const Kdist__Control *ctl = msg->env->control;
    void *reply_sock = from == FROM_LOCAL_CHANNEL ? c->control : c->router;
    if (!control_allowed(c, msg, from)) {
        c->control_refused++;
        char peer[300], reason[KD_PATH_MAX + 512];
        kd_msg_peer_text(msg, peer, sizeof peer);
        snprintf(reason, sizeof reason,
                 "'%s' is not allowed from %s: control commands come over the run directory's "
                 "control channel (%s) or from a key in cluster.security.operator_keys",
                 control_kind_name(ctl->kind), msg->user_id[0] ? "this key" : "the network",
                 c->control_endpoint);
        if (kd_log_allow(&c->drop_limit, 1.0))
            kd_log(KD_LOG_WARN, "COORD-CONTROL-REFUSED", "%s from '%s' refused (%ld so far)",
                   control_kind_name(ctl->kind), peer, c->control_refused);
        kd_wire_send_refused(reply_sock, msg->peer, msg->peer_len,
                             KDIST__REFUSAL_CODE__NOT_AUTHORIZED, reason);
        return;
    }
    switch (ctl->kind) {
    case KDIST__CONTROL__KIND__STATUS: {
        json_t *j = status_json(c);
        char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        if (!text) {
            drop(c, msg, "cannot encode the status");
            return;
        }
        Kdist__StatusReply s = KDIST__STATUS_REPLY__INIT;
        s.json = text;
        kd_env_t env = KDIST__ENVELOPE__INIT;
        env.body_case = KDIST__ENVELOPE__BODY_STATUS;
        env.status = &s;
        kd_wire_send(reply_sock, msg->peer, msg->peer_len, &env, NULL, 0, ZMQ_DONTWAIT);
        free(text);
        return;
    }
    case KDIST__CONTROL__KIND__STOP:
        kd_log(KD_LOG_INFO, "COORD-STOP", "stop requested");
        finish(c, "stopped");
        return;
    case KDIST__CONTROL__KIND__CHECKPOINT_NOW:
        save_checkpoint(c);
        return;
    case KDIST__CONTROL__KIND__DRAIN:
        for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
            member_t *m = &c->members[i];
            if (m->used && m->role == KDIST__ROLE__WORKER && strcmp(m->node_id, ctl->target) == 0) {
                m->drain = true;
                kd_log(KD_LOG_INFO, "COORD-DRAIN", "worker %s will stop after its step",
                       m->node_id);
                if (m->state != WORKER_PUSHED) send_weights(c, m, REPLY_STOP);
            }
        }
        return;
    default:
        drop(c, msg, "unknown control kind");
        return;
    }
}

/* ---- the local control channel ------------------------------------------------------------ */

/* Binds the control ROUTER at ipc://<run_dir>/control/coordinator.ipc (the directory 0700, so
 * only the run's owner connects), or in a private /tmp/kdist-control-* directory when that path
 * is too long for a socket address, and names it in <run_dir>/coordinator.control. */
static int setup_control_channel(coord_t *c, char *err, size_t errlen) {
    char abs[PATH_MAX];
    if (!realpath(c->run_dir, abs))
        return kd_err(err, errlen, "%s: %s", c->run_dir, strerror(errno));
    if (strlen(abs) + 16 > sizeof c->control_dir)
        return kd_err(err, errlen, "%s: the run directory's path is too long", abs);
    memcpy(c->control_dir, abs, strlen(abs));
    memcpy(c->control_dir + strlen(abs), "/control", sizeof "/control");
    const size_t sun_path_max = sizeof(((struct sockaddr_un *)0)->sun_path) - 1;
    if (strlen(c->control_dir) + strlen("/coordinator.ipc") > sun_path_max) {
        snprintf(c->control_dir, sizeof c->control_dir, "/tmp/kdist-control-XXXXXX");
        if (!mkdtemp(c->control_dir)) /* mkdtemp makes it 0700 */
            return kd_err(err, errlen, "cannot create %s: %s", c->control_dir, strerror(errno));
        c->control_dir_temporary = true;
    } else if (mkdir(c->control_dir, 0700) != 0 && errno != EEXIST) {
        return kd_err(err, errlen, "cannot create %s: %s", c->control_dir, strerror(errno));
    }
    struct stat st;
    if (lstat(c->control_dir, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != geteuid() ||
        chmod(c->control_dir, 0700) != 0)
        return kd_err(err, errlen,
                      "%s must be a directory of ours (mode 0700) for the control channel",
                      c->control_dir);
    snprintf(c->control_endpoint, sizeof c->control_endpoint, "ipc://%s/coordinator.ipc",
             c->control_dir);
    unlink(c->control_endpoint + 6); /* a socket file left by a killed coordinator */
    /* No CurveZMQ and no ZAP domain here: the directory's permissions are the authentication. */
    c->control = kd_socket_router_local(c->ctx, c->control_endpoint, err, errlen);
    if (!c->control) return -1;
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/coordinator.control", c->run_dir);
    return kd_write_file_atomic(path, c->control_endpoint, strlen(c->control_endpoint), err,
                                errlen);
}

static void close_control_channel(coord_t *c) {
    if (c->control) zmq_close(c->control);
    c->control = NULL;
    if (!c->control_endpoint[0]) return;
    unlink(c->control_endpoint + 6);
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/coordinator.control", c->run_dir);
    unlink(path);
    if (c->control_dir_temporary) rmdir(c->control_dir);
}

/* Commands from the control channel: control only (nodes talk on the network socket). */
static void serve_control_channel(coord_t *c) {
    for (int k = 0; k < 64; k++) {
        kd_msg_t msg;
        char err[KD_ERR_LEN];
        int r = kd_wire_recv(c->control, true, ZMQ_DONTWAIT, &msg, err, sizeof err);
        if (r == KD_WIRE_NONE || r == KD_WIRE_CLOSED) return;
        if (r == KD_WIRE_BAD)
            drop(c, &msg, err);
        else if (msg.env->body_case == KDIST__ENVELOPE__BODY_CONTROL)
            on_control(c, &msg, FROM_LOCAL_CHANNEL);
        else
            drop(c, &msg, "the control channel takes control commands only");
        kd_msg_close(&msg);
    }
}

/* ---- the loop ---------------------------------------------------------------------------- */

static void on_message(coord_t *c, kd_msg_t *msg) {
    kd_env_t *env = msg->env;
    if (env->body_case == KDIST__ENVELOPE__BODY_HELLO) {
        on_hello(c, msg);
        return;
    }
    if (env->body_case == KDIST__ENVELOPE__BODY_CONTROL) {
        on_control(c, msg, FROM_NETWORK);
        return;
    }
    member_t *m = find_member(c, msg->peer, msg->peer_len);
    if (!m) {
        send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__UNKNOWN_MEMBER,
                     "unknown member: say hello");
        drop(c, msg, "message from a node that is not a member");
        return;
    }
    if (c->curve && strcmp(msg->user_id, m->curve_key) != 0) { /* a member is bound to its key */
        drop(c, msg, "a message for a member from another key than the one it joined with");
        return;
    }
    m->last_seen = kd_now();
    switch (env->body_case) {
    case KDIST__ENVELOPE__BODY_HEARTBEAT:
        on_heartbeat(c, m, env->heartbeat);
        return;
    case KDIST__ENVELOPE__BODY_PUSH:
        if (m->role != KDIST__ROLE__WORKER) break;
        on_push(c, m, msg);
        return;
    case KDIST__ENVELOPE__BODY_NACK:
        if (m->role != KDIST__ROLE__WORKER) break;
        on_nack(c, m, msg);
        return;
    case KDIST__ENVELOPE__BODY_GOODBYE:
        m->said_goodbye = true;
        remove_member(c, m, "leave");
        return;
    default:
        break;
    }
    char why[96];
    snprintf(why, sizeof why, "a %s may not send '%s'", role_name(m->role), kd_wire_body_name(env));
    drop(c, msg, why);
}

static void heartbeat_and_reap(coord_t *c) {
    double now = kd_now();
    double hb = c->r.cluster.heartbeat_ms / 1000.0,
           timeout = c->r.cluster.heartbeat_timeout_ms / 1000.0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (!m->used) continue;
        if (now - m->last_seen > timeout) {
            kd_log(KD_LOG_WARN, "COORD-MEMBER-DEAD", "%s %s silent for %.1f s: declared dead",
                   role_name(m->role), m->node_id, now - m->last_seen);
            remove_member(c, m, "dead");
            continue;
        }
        if (now - m->last_sent >= hb) {
            Kdist__Heartbeat h = KDIST__HEARTBEAT__INIT;
            kd_env_t env = KDIST__ENVELOPE__INIT;
            env.body_case = KDIST__ENVELOPE__BODY_HEARTBEAT;
            env.heartbeat = &h;
            if (send_to(c, m, &env, NULL, 0) != 0 && errno == EHOSTUNREACH)
                m->last_sent = now; /* disconnected: the timeout decides */
        }
    }
}

/* The end: stop every node, final evaluation, outputs. */
static void stop_nodes(coord_t *c) {
    /* A step still open when the run stops is not applied: its batches stay unapplied. */
    for (int k = 0; k < c->step_count; k++) {
        c->in_step[c->step_msgs[k].env->push->ref->batch_id] = 0;
        kd_msg_close(&c->step_msgs[k]);
    }
    c->step_count = 0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (!m->used) continue;
        if (m->role == KDIST__ROLE__WORKER)
            send_weights(c, m, REPLY_STOP);
        else if (m->role == KDIST__ROLE__TEACHER)
            send_control(c, m, KDIST__CONTROL__KIND__STOP);
    }
}

static int write_summary(coord_t *c, const eval_result_t *final) {
    double t = elapsed(c);
    json_t *j = json_pack(
        "{s:s, s:s, s:s, s:o, s:o, s:o, s:o, s:I, s:o, s:I, s:I, s:o, s:o, s:i, s:I, s:s, "
        "s:{s:I, s:I, s:I, s:I, s:I, s:I}}",
        "status", c->status ? c->status : "completed", "name", c->r.name, "run_id", c->s.run_id,
        "test_accuracy", kd_json_number(final->test.accuracy), "test_loss",
        kd_json_number(final->test.loss), "val_accuracy", kd_json_number(final->val.accuracy),
        "val_loss", kd_json_number(final->val.loss), "best_step", (json_int_t) final->best_step,
        "best_val_accuracy", kd_json_number(final->best_val_accuracy), "epochs",
        (json_int_t)(c->applied_count == c->n_batches ? c->s.epoch + 1 : c->s.epoch), "steps",
        (json_int_t)c->s.step, "samples_per_sec", kd_json_number(train_rate(c)), "wall_seconds",
        kd_json_number(t), "workers_max", c->workers_max, "parameters",
        (json_int_t)c->model->n_params, "consistency",
        kd_consistency_name(c->r.cluster.consistency), "ledger", "batches_expected",
        (json_int_t)c->s.batches_expected, "batches_applied", (json_int_t)c->s.batches_applied,
        "duplicates_dropped", (json_int_t)c->s.duplicates, "restreamed",
        (json_int_t)c->s.restreamed, "stale_dropped", (json_int_t)c->stale_dropped,
        "messages_dropped", (json_int_t)c->messages_dropped);
    if (!j) {
        kd_log(KD_LOG_ERROR, "COORD-SUMMARY-FAIL", "cannot encode the summary");
        return -1;
    }
    if (c->fail_reason[0]) json_object_set_new(j, "error", json_string(c->fail_reason));
    json_t *ledger = json_object_get(j, "ledger");
    json_object_set_new(ledger, "connections_refused", json_integer(c->connections_refused));
    json_object_set_new(ledger, "gradients_rejected", json_integer(c->gradients_rejected));
    json_object_set_new(ledger, "nacks", json_integer(c->nacks));
    json_object_set_new(ledger, "members_evicted", json_integer(c->evicted));
    json_object_set_new(ledger, "hellos_refused", json_integer(c->hellos_refused));
    json_object_set_new(ledger, "control_refused", json_integer(c->control_refused));
    json_t *lost = json_array();
    for (long i = 0; i < c->n_lost && i < COORD_MAX_LOST; i++)
        json_array_append_new(lost, json_pack("{s:s, s:s, s:s, s:o}", "role", c->lost[i].role, "id",
                                              c->lost[i].id, "event", c->lost[i].event, "time",
                                              kd_json_number(c->lost[i].time)));
    json_object_set_new(j, "members_lost", lost);
    json_object_set_new(j, "members_lost_total", json_integer(c->n_lost));
    json_object_set_new(j, "teacher", teacher_work_json(c));
    if (!isnan(final->test.agreement)) { /* the student against the teacher */
        json_t *vs = json_object_get(j, "teacher");
        json_object_set_new(vs, "test_agreement", kd_json_number(final->test.agreement));
        json_object_set_new(vs, "test_kl", kd_json_number(final->test.teacher_kl));
        json_object_set_new(vs, "val_agreement", kd_json_number(final->val.agreement));
        json_object_set_new(vs, "val_kl", kd_json_number(final->val.teacher_kl));
    }
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(j);
    if (!text) {
        kd_log(KD_LOG_ERROR, "COORD-SUMMARY-FAIL", "cannot encode the summary");
        return -1;
    }
    char path[KD_PATH_MAX + 32], err[KD_ERR_LEN];
    snprintf(path, sizeof path, "%s/summary.json", c->run_dir);
    int rc = kd_write_file_atomic(path, text, strlen(text), err, sizeof err);
    if (rc) kd_log(KD_LOG_ERROR, "COORD-SUMMARY-FAIL", "%s", err);
    free(text);
    return rc;
}

static int run_loop(coord_t *c) {
    double last_housekeeping = 0;
    while (!kd_node_stop_requested || c->phase == RUN_RUNNING) {
        if (kd_node_stop_requested && c->phase == RUN_RUNNING) finish(c, "stopped");
        if (c->phase == RUN_FINISHING && c->finish_deadline == 0) {
            stop_nodes(c);
            c->finish_deadline = kd_now() + 3.0 * c->r.cluster.heartbeat_ms / 1000.0 + 1.0;
        }
        if (c->phase == RUN_FINISHING &&
            (live_count(c, KDIST__ROLE__WORKER) + live_count(c, KDIST__ROLE__TEACHER) == 0 ||
             kd_now() > c->finish_deadline))
            break;
        zmq_pollitem_t items[3] = {{c->router, 0, ZMQ_POLLIN, 0},
                                   {evaluator_socket(c->eval), 0, ZMQ_POLLIN, 0},
                                   {c->control, 0, ZMQ_POLLIN, 0}};
        int rc = zmq_poll(items, 3, 50);
        if (rc < 0 && errno != EINTR) {
            kd_log(KD_LOG_ERROR, "COORD-POLL", "zmq_poll: %s", zmq_strerror(errno));
            return -1;
        }
        /* bounded batch per wake-up, so housekeeping runs under load too */
        for (int k = 0; k < 256 && (items[0].revents & ZMQ_POLLIN); k++) {
            kd_msg_t msg;
            char err[KD_ERR_LEN];
            int r = kd_wire_recv(c->router, true, ZMQ_DONTWAIT, &msg, err, sizeof err);
            if (r == KD_WIRE_NONE) break;
            if (r == KD_WIRE_CLOSED) return -1;
            if (r == KD_WIRE_BAD) {
                drop(c, &msg, err);
                member_t *m = find_member(c, msg.peer, msg.peer_len);
                if (m) m->last_seen = kd_now();
                continue;
            }
            on_message(c, &msg);
            kd_msg_close(&msg);
        }
        if (items[2].revents & ZMQ_POLLIN) serve_control_channel(c);
        eval_result_t res;
        while (evaluator_result(c->eval, &res) == 0) handle_eval_result(c, &res);
        if (kd_now() - last_housekeeping >= 0.05) {
            heartbeat_and_reap(c);
            restream_stalled(c);
            if (!c->assigned && c->assign_at > 0 && kd_now() >= c->assign_at) assign_epoch(c);
            kd_wire_refused(c->router_monitor, "the coordinator socket", &c->connections_refused);
            last_housekeeping = kd_now();
        }
    }
    return 0;
}

/* ---- set-up ------------------------------------------------------------------------------ */

#define USAGE                                                                                      \
    "usage: kdist-coordinator --recipe RECIPE --run-dir DIR [--resume] [--key FILE] "              \
    "[section.key=value ...]\n"                                                                    \
    "  --key FILE  the coordinator's CurveZMQ key pair (kdist keygen), when the recipe sets\n"     \
    "              cluster.security.curve; default: $KDIST_KEY"

/* cluster.security: our key pair (--key or KDIST_KEY) and the keys that may connect, checked
 * against the recipe; our public key goes into the resolved recipe for the other nodes. */
static int setup_curve(coord_t *c, const char *recipe, const char *key_opt, char *err,
                       size_t errlen) {
    if (!c->r.cluster.security.curve) {
        if (key_opt)
            return kd_err(err, errlen,
                          "--key %s given but %s has cluster.security.curve off: turn it on, or "
                          "drop --key",
                          key_opt, recipe);
        return 0;
    }
    const char *env = getenv(KD_CURVE_ENV_KEY);
    const char *key = key_opt ? key_opt : env && env[0] ? env : NULL;
    if (!key)
        return kd_err(err, errlen,
                      "%s sets cluster.security.curve: give the coordinator its key pair with "
                      "--key FILE (made by `kdist keygen`) or set %s",
                      recipe, KD_CURVE_ENV_KEY);
    char why[KD_ERR_LEN];
    if (kd_curve_load_pair(key, &c->curve_pair, why, sizeof why) != 0)
        return kd_err(err, errlen, "%s: %s", key_opt ? "--key" : KD_CURVE_ENV_KEY, why);
    const char *given = c->r.cluster.security.coordinator_key;
    if (given[0]) {
        char pub[KD_CURVE_Z85_LEN + 1];
        snprintf(why, sizeof why, "%s: cluster.security.coordinator_key", recipe);
        if (kd_curve_load_public(given, why, pub, err, errlen) != 0) return -1;
        if (strcmp(pub, c->curve_pair.public_z85) != 0)
            return kd_err(err, errlen,
                          "%s: cluster.security.coordinator_key is %s but %s holds the pair of "
                          "%s: give the coordinator the pair that key belongs to",
                          recipe, pub, key, c->curve_pair.public_z85);
    }
    snprintf(c->r.cluster.security.coordinator_key, sizeof c->r.cluster.security.coordinator_key,
             "%s", c->curve_pair.public_z85);
    if (kd_curve_roles_load(&c->r, recipe, &c->keys, err, errlen) != 0) return -1;
    c->curve = true;
    return 0;
}

static int setup(coord_t *c, int argc, char **argv, bool *resume, char *err, size_t errlen) {
    const char *recipe = NULL, *run_dir = NULL, *key = NULL;
    const char *overrides[MAX_OVERRIDES];
    int n_over = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--recipe") == 0 && i + 1 < argc)
            recipe = argv[++i];
        else if (strcmp(argv[i], "--run-dir") == 0 && i + 1 < argc)
            run_dir = argv[++i];
        else if (strcmp(argv[i], "--resume") == 0)
            *resume = true;
        else if (strcmp(argv[i], "--key") == 0 && i + 1 < argc)
            key = argv[++i];
        else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            printf("%s\n", USAGE);
            exit(0);
        } else if (strchr(argv[i], '=') && argv[i][0] != '-' && n_over < MAX_OVERRIDES)
            overrides[n_over++] = argv[i];
        else
            return kd_err(err, errlen, "unexpected argument '%s'\n%s", argv[i], USAGE);
    }
    if (!recipe || !run_dir) return kd_err(err, errlen, "%s", USAGE);
    if (kd_recipe_load(recipe, overrides, n_over, &c->r, err, errlen) != 0) return -1;
    if (setup_curve(c, recipe, key, err, errlen) != 0) return -1;
    char what[KD_PATH_MAX + 32];
    snprintf(what, sizeof what, "%s: cluster.bind", recipe);
    if (kd_curve_check_plaintext_bind(&c->r, c->r.cluster.bind, what, err, errlen) != 0) return -1;
    if (c->r.distill.loss.alpha > 0 && !c->r.cache.import[0] &&
        (c->r.teacher.n_layers == 0 || !c->r.teacher.checkpoint[0]))
        return kd_err(err, errlen,
                      "%s: distill.alpha is %g but there is no teacher: set teacher.layers and "
                      "teacher.checkpoint, or cache.import to distil from imported logits",
                      recipe, (double)c->r.distill.loss.alpha);
    snprintf(c->run_dir, sizeof c->run_dir, "%s", run_dir);
    snprintf(c->ckpt_dir, sizeof c->ckpt_dir, "%s/checkpoints", run_dir);
    char best_dir[KD_PATH_MAX + 64];
    snprintf(best_dir, sizeof best_dir, "%s/best", c->ckpt_dir);
    if (kd_mkdirs(best_dir, err, errlen) != 0) return -1;
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/recipe.yaml", run_dir);
    if (kd_recipe_write(&c->r, path, err, errlen) != 0) return -1;
    if (kd_splits_load(&c->r, &c->data, err, errlen) != 0) return -1;
    if (kd_model_from_recipe(&c->r, false, c->data.train, &c->model, err, errlen) != 0) return -1;
    c->opt = kd_optim_new(&c->r.optim.cfg, c->model->n_params);
    c->sched = c->r.schedule.cfg;
    c->sched.total_steps = kd_train_total_steps(&c->r, c->data.train->n);
    c->n_batches = kd_epoch_count(c->data.train->n, (size_t)c->r.train.batch_size);
    c->applied = kd_xcalloc(c->n_batches ? c->n_batches : 1, 1);
    c->in_step = kd_xcalloc(c->n_batches ? c->n_batches : 1, 1);
    c->nacked = kd_xcalloc(c->n_batches ? c->n_batches : 1, sizeof *c->nacked);
    c->owner = kd_xcalloc(c->n_batches ? c->n_batches : 1, sizeof *c->owner);
    c->step_grad = kd_alloc_floats(c->model->n_params);
    c->win_layer_fwd = kd_xcalloc((size_t)c->model->n_layers, sizeof(double));
    c->win_layer_bwd = kd_xcalloc((size_t)c->model->n_layers, sizeof(double));
    c->s.best_step = -1;
    snprintf(c->s.run_id, sizeof c->s.run_id, "%s-%llx", c->r.name,
             (unsigned long long)kd_wire_new_incarnation());
    return 0;
}

static int resume_from_checkpoint(coord_t *c, char *err, size_t errlen) {
    uint8_t *applied = NULL;
    size_t n = 0;
    char found[KD_PATH_MAX + 300];
    coord_state_t s = c->s;
    int rc = coord_checkpoint_resume(c->ckpt_dir, &s, c->model, c->opt, &applied, &n, found,
                                     sizeof found);
    if (rc == 1) {
        int files = coord_checkpoint_count(c->ckpt_dir);
        if (files > 0) /* starting afresh would throw the run away: say so instead */
            return kd_err(err, errlen,
                          "--resume: none of the %d checkpoint(s) in %s is valid (see the "
                          "COORD-CKPT-SKIP lines): move them away to start the run afresh",
                          files, c->ckpt_dir);
        kd_log(KD_LOG_INFO, "COORD-RESUME", "no checkpoint in %s yet: starting afresh",
               c->ckpt_dir);
        return 1;
    }
    if (n != c->n_batches) {
        free(applied);
        return kd_err(err, errlen, "%s: its ledger has %zu batches, this recipe gives %zu", found,
                      n, c->n_batches);
    }
    c->s = s;
    memcpy(c->applied, applied, n);
    free(applied);
    c->applied_count = 0;
    for (size_t b = 0; b < n; b++) c->applied_count += c->applied[b] != 0;
    kd_log(KD_LOG_INFO, "COORD-RESUME", "resumed from %s: epoch %u, step %ld, %zu/%zu batches",
           found, c->s.epoch, c->s.step, c->applied_count, c->n_batches);
    return 0;
}

int main(int argc, char **argv) {
    static coord_t the_coordinator; /* large: static, not on the stack */
    coord_t *c = &the_coordinator;
    char err[KD_ERR_LEN];
    bool resume = false;
    int exit_code = 1;
    kd_node_signals_install();
    kd_log_init("coordinator", "0", KD_LOG_INFO, NULL);
    if (setup(c, argc, argv, &resume, err, sizeof err) != 0) {
        fprintf(stderr, "kdist-coordinator: %s\n", err);
        return 2;
    }
    kd_log_level_t level;
    if (kd_log_level_parse(c->r.logging.level, &level) == 0) kd_log_threshold = level;
    kd_set_threads((int)c->r.train.threads);
    if (!resume && coord_checkpoint_count(c->ckpt_dir) > 0) {
        fprintf(stderr,
                "kdist-coordinator: %s holds checkpoints of an earlier run: resume it with "
                "--resume, or give another --run-dir\n",
                c->ckpt_dir);
        return 2;
    }
    int resumed = resume ? resume_from_checkpoint(c, err, sizeof err) : 1;
    if (resumed < 0) {
        kd_log(KD_LOG_ERROR, "COORD-RESUME-FAIL", "%s", err);
        return 2;
    }

    c->ctx = zmq_ctx_new();
    if (c->curve) { /* the gatekeeper first: without it libzmq would let any key in */
        if (!(c->zap = kd_zap_new(c->ctx, c->keys.all, "COORD-CURVE-REFUSED", err, sizeof err))) {
            kd_log(KD_LOG_ERROR, "COORD-CURVE", "%s", err);
            goto out;
        }
        kd_log(KD_LOG_INFO, "COORD-CURVE",
               "CurveZMQ on: public key %s, %d authorized key(s); every other key is refused",
               c->curve_pair.public_z85, c->keys.all->n);
    }
    c->router = kd_socket_router_curve(c->ctx, c->r.cluster.bind, (int)c->r.cluster.heartbeat_ms,
                                       c->curve ? &c->curve_pair : NULL, c->endpoint,
                                       sizeof c->endpoint, err, sizeof err);
    if (!c->router) {
        kd_log(KD_LOG_ERROR, "COORD-BIND", "%s", err);
        goto out;
    }
    if (setup_control_channel(c, err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "COORD-CONTROL", "%s", err);
        goto out;
    }
    if (!(c->router_monitor = kd_wire_monitor(c->ctx, c->router, "coordinator", err, sizeof err)))
        kd_log(KD_LOG_WARN, "COORD-MONITOR", "%s: refused connections go uncounted", err);
    if (!(c->metrics = kd_metrics_open(c->run_dir, err, sizeof err))) {
        kd_log(KD_LOG_ERROR, "COORD-METRICS", "%s", err);
        goto out;
    }
    if (kd_metrics_graph(c->metrics, c->model, err, sizeof err) != 0)
        kd_log(KD_LOG_WARN, "COORD-METRICS", "%s", err);
    char best[KD_PATH_MAX + 96];
    int n_best = snprintf(best, sizeof best, "%s/best/student.safetensors", c->ckpt_dir);
    KD_ASSERT(n_best < (int)sizeof best); /* run_dir is bounded at set-up */
    /* What to beat: the checkpoint's best, or the best file's if that came later */
    evaluator_best_t to_beat = {.step = c->s.best_step,
                                .val_accuracy = c->s.best_val_accuracy,
                                .evals_since = (int)c->s.evals_since_best},
                     on_disk;
    if (resumed == 0 && evaluator_read_best(best, &on_disk) == 0 &&
        (to_beat.step < 0 || on_disk.val_accuracy > to_beat.val_accuracy)) {
        kd_log(KD_LOG_INFO, "COORD-RESUME-BEST",
               "%s holds the best so far (step %ld, val accuracy %.4f), newer than the "
               "checkpoint's",
               best, on_disk.step, on_disk.val_accuracy);
        to_beat = (evaluator_best_t){.step = on_disk.step, .val_accuracy = on_disk.val_accuracy};
        c->s.best_step = on_disk.step;
        c->s.best_val_accuracy = on_disk.val_accuracy;
    }
    c->eval = evaluator_new(c->ctx, &c->r, c->model, &c->data, best, &to_beat);
    c->t0 = c->win_t0 = kd_now();
    setup_shared_memory(c);
    if (resumed == 0) add_event(c, "restart", "coordinator", "0"); /* from its checkpoint */

    char path[KD_PATH_MAX + 64];
    int n_path = snprintf(path, sizeof path, "%s/coordinator.endpoint", c->run_dir);
    KD_ASSERT(n_path < (int)sizeof path); /* run_dir is bounded at set-up */
    if (kd_write_file_atomic(path, c->endpoint, strlen(c->endpoint), err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "COORD-ENDPOINT", "%s", err);
        goto out;
    }
    kd_log(KD_LOG_INFO, "COORD-START",
           "run %s: %zu parameters, %zu training samples in %zu batches, %s, listening on %s",
           c->s.run_id, c->model->n_params, c->data.train->n, c->n_batches,
           kd_consistency_name(c->r.cluster.consistency), c->endpoint);
    if (resumed != 0)
        start_epoch(c, 0);
    else if (c->applied_count < c->n_batches)
        assign_epoch(c); /* the checkpoint's epoch goes on */
    else if (c->s.epoch + 1 < (uint32_t)c->r.train.epochs)
        start_epoch(c, c->s.epoch + 1);
    else
        finish(c, "completed"); /* the checkpoint is the end of the run */

    if (run_loop(c) != 0) goto out;
    if (!c->status) c->status = "completed";
    eval_result_t final = {0};
    if (c->last_eval_step != c->s.step) request_eval(c);
    if (evaluator_drain(c->eval, &final) == 0 && final.step == c->s.step)
        handle_eval_result(c, &final);
    else if (c->have_eval && c->last_eval.step == c->s.step)
        final = c->last_eval; /* it came in while the nodes said goodbye */
    n_path = snprintf(path, sizeof path, "%s/student.safetensors", c->run_dir);
    KD_ASSERT(n_path < (int)sizeof path); /* run_dir is bounded at set-up */
    bool saved = kd_checkpoint_save(c->model, path, err, sizeof err) == 0;
    if (!saved) {
        kd_log(KD_LOG_ERROR, "COORD-SAVE", "%s", err);
        fail_run(c, "the final weights were not saved: %s", err);
    }
    save_checkpoint(c);
    write_metrics(c);
    /* 0 only for a run that ended as planned with its outputs written */
    exit_code = write_summary(c, &final) == 0 && saved && strcmp(c->status, "failed") != 0 ? 0 : 1;
    kd_log(KD_LOG_INFO, "COORD-DONE",
           "%s after %ld steps: test accuracy %.4f, %ld/%ld batches applied, %ld duplicates",
           c->status, c->s.step, final.test.accuracy, c->s.batches_applied, c->s.batches_expected,
           c->s.duplicates);
out:
    evaluator_destroy(&c->eval);
    kd_metrics_close(&c->metrics);
    invalidate_weights(c);
    for (int k = 0; k < c->step_count; k++) kd_msg_close(&c->step_msgs[k]);
    if (c->router_monitor) zmq_close(c->router_monitor);
    if (c->router) zmq_close(c->router);
    close_control_channel(c);
    kd_zap_destroy(&c->zap);
    kd_curve_roles_free(&c->keys);
    if (c->ctx) zmq_ctx_term(c->ctx);
    kd_optim_destroy(&c->opt);
    kd_model_destroy(&c->model);
    kd_splits_destroy(&c->data);
    free(c->applied);
    free(c->in_step);
    free(c->nacked);
    free(c->owner);
    free(c->step_grad);
    free(c->win_layer_fwd);
    free(c->win_layer_bwd);
    return exit_code;
}
