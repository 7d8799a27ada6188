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

static coord_t C;

/* ---- helpers ----------------------------------------------------------------------------- */

static double elapsed(void) {
    return C.s.elapsed + (kd_now() - C.t0);
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

static void add_event(const char *event, const char *role, const char *id) {
    if (C.n_events == COORD_MAX_EVENTS) {
        memmove(C.events, C.events + 1, sizeof C.events[0] * (COORD_MAX_EVENTS - 1));
        C.n_events--;
    }
    coord_event_t *e = &C.events[C.n_events++];
    e->time = elapsed();
    snprintf(e->event, sizeof e->event, "%s", event);
    snprintf(e->role, sizeof e->role, "%s", role);
    snprintf(e->id, sizeof e->id, "%s", id);
}

static void drop(const kd_msg_t *msg, const char *why) {
    C.messages_dropped++;
    if (kd_log_allow(&C.drop_limit, 1.0)) {
        char peer[300];
        kd_msg_peer_text(msg, peer, sizeof peer);
        kd_log(KD_LOG_WARN, "KD-WIRE-DROP", "dropped a message from '%s': %s (%ld dropped so far)",
               peer, why, C.messages_dropped);
    }
}

static member_t *find_member(const uint8_t *rid, size_t len) {
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &C.members[i];
        if (m->used && m->rid_len == len && memcmp(m->rid, rid, len) == 0) return m;
    }
    return NULL;
}

static int live_count(Kdist__Role role) {
    int n = 0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (C.members[i].used && C.members[i].role == role) n++;
    return n;
}

static int send_to(member_t *m, kd_env_t *env, const kd_wire_tensor_t *t, int n) {
    int rc = kd_wire_send(C.router, m->rid, m->rid_len, env, t, n, ZMQ_DONTWAIT);
    if (rc == 0)
        m->last_sent = kd_now();
    else if (kd_log_allow(&C.drop_limit, 1.0))
        kd_log(KD_LOG_WARN, "COORD-SEND-FAIL", "cannot send %s to %s %s: %s",
               kd_wire_body_name(env), role_name(m->role), m->node_id, zmq_strerror(errno));
    return rc;
}

/* Whether libzmq still has a connection for m: a heartbeat to it does not come back
 * EHOSTUNREACH (ROUTER_MANDATORY). */
static bool member_reachable(member_t *m) {
    Kdist__Heartbeat h = KDIST__HEARTBEAT__INIT;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &h;
    return kd_wire_send(C.router, m->rid, m->rid_len, &env, NULL, 0, ZMQ_DONTWAIT) == 0 ||
           errno != EHOSTUNREACH;
}

static void free_snapshot(void *data, void *hint) {
    (void)hint;
    free(data);
}

static void refresh_weights(void) {
    if (C.weights_valid) return;
    size_t bytes = C.model->n_params * sizeof(float);
    float *snapshot = kd_xmalloc(bytes);
    memcpy(snapshot, C.model->params, bytes);
    zmq_msg_init_data(&C.weights_msg, snapshot, bytes, free_snapshot, NULL);
    C.weights_valid = true;
}

static void invalidate_weights(void) {
    if (C.weights_valid) zmq_msg_close(&C.weights_msg);
    C.weights_valid = false;
}

static kd_wire_tensor_t weights_tensor(void) {
    refresh_weights();
    kd_wire_tensor_t t = {.name = "weights",
                          .dtype = KD_DTYPE_F32,
                          .ndim = 1,
                          .shape = {(int64_t)C.model->n_params},
                          .share = &C.weights_msg};
    return t;
}

/* ---- the same-host fast path (kd_shm.h) ------------------------------------------------- */

static void setup_shared_memory(void) {
    if (!C.r.cluster.shared_memory) return;
    kd_node_hostname(C.hostname, sizeof C.hostname);
    if (getrandom(&C.shm_token, sizeof C.shm_token, 0) != sizeof C.shm_token)
        C.shm_token = (uint64_t)getpid() << 32 ^ (uint64_t)(kd_now() * 1e6);
    long slots = C.r.cluster.workers + 1; /* one per worker holding a version, one to write */
    if (slots > MAX_SHM_SLOTS) slots = MAX_SHM_SLOTS;
    char err[KD_ERR_LEN];
    if (kd_shm_create(&C.weights_shm, "kdist-weights", (uint32_t)slots, C.model->n_params,
                      C.shm_token, err, sizeof err) != 0) {
        kd_log(KD_LOG_WARN, "COORD-SHM", "%s: workers on this machine will use TCP", err);
        return;
    }
    for (long i = 0; i < slots; i++) C.slot_version[i] = UINT64_MAX;
}

/* A gradient segment for a worker on this machine, described in *offer; false to use TCP. */
static bool offer_shared_memory(member_t *m, Kdist__SharedMemory *offer) {
    if (!C.weights_shm.base || m->role != KDIST__ROLE__WORKER || strcmp(m->host, C.hostname) != 0)
        return false;
    char name[96], err[KD_ERR_LEN];
    snprintf(name, sizeof name, "kdist-gradient-%s", m->node_id);
    if (kd_shm_create(&m->grad_shm, name, 1, C.model->n_params, C.shm_token, err, sizeof err) !=
        0) {
        kd_log(KD_LOG_WARN, "COORD-SHM", "%s: worker %s will use TCP", err, m->node_id);
        return false;
    }
    offer->pid = (uint32_t)getpid();
    offer->weights_fd = C.weights_shm.fd;
    offer->weight_slots = C.weights_shm.n_slots;
    offer->gradient_fd = m->grad_shm.fd;
    offer->token = C.shm_token;
    return true;
}

/* The slot holding the current version, written now if none does; -1 when every slot is still
 * being read by some worker (the answer then goes over TCP). */
static int current_slot(void) {
    int free_slot = -1;
    for (uint32_t s = 0; s < C.weights_shm.n_slots; s++) {
        if (C.slot_version[s] == C.s.version) return (int)s;
        if (C.slot_readers[s] == 0 && free_slot < 0) free_slot = (int)s;
    }
    if (free_slot < 0) return -1;
    kd_shm_write(&C.weights_shm, (uint32_t)free_slot, C.s.version, C.model->params);
    C.slot_version[free_slot] = C.s.version;
    return free_slot;
}

static void release_slot(member_t *m) {
    if (m->held_slot) C.slot_readers[m->held_slot - 1]--;
    m->held_slot = 0;
}

/* The worker pushed a gradient computed on `version`: it is done with any slot it was pointed to
 * up to then (it computes on its slot in place, so an idle worker keeps its slot). */
static void note_weights_held(member_t *m, uint64_t version) {
    if (m->held_slot && version >= C.slot_version[m->held_slot - 1]) release_slot(m);
}

/* A push's gradient, from its frame or the worker's segment; NULL with why set if unusable. */
static float *push_gradient(member_t *m, kd_msg_t *msg, char *why, size_t whylen) {
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
    int64_t shape[1] = {(int64_t)C.model->n_params};
    return (float *)kd_msg_tensor(msg, 0, "gradient", KD_DTYPE_F32, 1, shape, why, whylen);
}

/* A worker leaves while the open sync step holds its shared-memory gradient: keep a copy. */
static void keep_step_gradients(member_t *m) {
    const int index = (int)(m - C.members);
    for (int k = 0; k < C.step_count; k++)
        if (C.step_member[k] == index && !C.step_copies[k] &&
            C.step_msgs[k].env->push->shared_memory) {
            size_t bytes = C.model->n_params * sizeof(float);
            C.step_copies[k] = kd_xmalloc(bytes);
            memcpy(C.step_copies[k], C.step_grads[k], bytes);
            C.step_grads[k] = C.step_copies[k];
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
static reply_t go_on(void) {
    return C.phase == RUN_FINISHING ? REPLY_STOP : REPLY_WEIGHTS;
}

/* Weights to a worker, with the current weights unless it waits or stops. */
static void send_weights(member_t *m, reply_t reply) {
    Kdist__Weights w = KDIST__WEIGHTS__INIT;
    w.version = C.s.version;
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
        release_slot(m);
        int slot = m->shm_active ? current_slot() : -1;
        if (slot >= 0) {
            C.slot_readers[slot]++;
            m->held_slot = w.shared_slot = (uint32_t)slot + 1;
        } else {
            t = weights_tensor();
            n_tensors = 1;
        }
    }
    send_to(m, &env, &t, n_tensors);
    m->state = w.wait ? WORKER_HELD : WORKER_COMPUTING;
}

static void send_refused(const uint8_t *rid, size_t len, Kdist__RefusalCode code,
                         const char *reason) {
    kd_wire_send_refused(C.router, rid, len, code, reason);
}

static void send_control(member_t *m, Kdist__Control__Kind kind) {
    Kdist__Control c = KDIST__CONTROL__INIT;
    c.kind = kind;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
    env.control = &c;
    send_to(m, &env, NULL, 0);
}

/* ---- the epoch, the ledger and the assignment --------------------------------------------- */

static int teacher_order(const void *a, const void *b) {
    const member_t *x = *(member_t *const *)a, *y = *(member_t *const *)b;
    return strcmp(x->node_id, y->node_id);
}

/* Sends every live teacher its share (b % T) of the given batches of the current epoch. */
static void assign_batches(const uint32_t *ids, size_t n, bool restream) {
    member_t *teachers[COORD_MAX_MEMBERS];
    int T = 0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (C.members[i].used && C.members[i].role == KDIST__ROLE__TEACHER)
            teachers[T++] = &C.members[i];
    if (T == 0 || n == 0) return;
    qsort(teachers, (size_t)T, sizeof teachers[0], teacher_order);
    uint32_t *share = kd_xmalloc(n * sizeof *share);
    for (int t = 0; t < T; t++) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if ((int)(ids[i] % (uint32_t)T) == t) {
                share[k++] = ids[i];
                C.owner[ids[i]] = (int)(teachers[t] - C.members);
            }
        Kdist__Assign a = KDIST__ASSIGN__INIT;
        a.epoch = C.s.epoch;
        a.seed = (uint64_t)C.r.seed;
        a.batch_size = (uint32_t)C.r.train.batch_size;
        a.n_batch_ids = k;
        a.batch_ids = share;
        a.restream = restream;
        kd_env_t env = KDIST__ENVELOPE__INIT;
        env.body_case = KDIST__ENVELOPE__BODY_ASSIGN;
        env.assign = &a;
        if (k || !restream) send_to(teachers[t], &env, NULL, 0);
    }
    free(share);
}

/* The batches of this epoch that are neither applied nor collected in the open step. */
static size_t unapplied_batches(uint32_t *out) {
    size_t k = 0;
    for (size_t b = 0; b < C.n_batches; b++)
        if (!C.applied[b] && !C.in_step[b]) out[k++] = (uint32_t)b;
    return k;
}

static void assign_epoch(void) {
    if (live_count(KDIST__ROLE__TEACHER) == 0) return; /* the first teacher's Hello assigns */
    uint32_t *ids = kd_xmalloc((C.n_batches ? C.n_batches : 1) * sizeof *ids);
    size_t n = unapplied_batches(ids);
    assign_batches(ids, n, false);
    free(ids);
    C.assigned = true;
    C.assign_at = 0;
    C.last_progress = kd_now();
    kd_log(KD_LOG_INFO, "COORD-EPOCH", "epoch %u: %zu batches to %d teacher node(s)", C.s.epoch, n,
           live_count(KDIST__ROLE__TEACHER));
}

static void start_epoch(uint32_t epoch) {
    C.s.epoch = epoch;
    memset(C.applied, 0, C.n_batches);
    memset(C.in_step, 0, C.n_batches);
    memset(C.nacked, 0, C.n_batches * sizeof *C.nacked);
    C.applied_count = 0;
    C.s.batches_expected += (long)C.n_batches;
    C.assigned = false;
    assign_epoch();
}

/* A teacher node is gone: the batches of this epoch it held and that are not applied go to the
 * live ones at once (those it streamed before it died may still come back: the ledger drops
 * the second copy). With no teacher left, the next one to say hello gets the whole rest. */
static void reassign_share(const member_t *gone) {
    if (!C.assigned) return;
    const int index = (int)(gone - C.members);
    uint32_t *ids = kd_xmalloc((C.n_batches ? C.n_batches : 1) * sizeof *ids);
    size_t n = 0;
    for (size_t b = 0; b < C.n_batches; b++)
        if (C.owner[b] == index && !C.applied[b] && !C.in_step[b]) ids[n++] = (uint32_t)b;
    if (live_count(KDIST__ROLE__TEACHER) == 0) {
        C.assigned = false;
        kd_log(KD_LOG_WARN, "COORD-NO-TEACHER",
               "no teacher node left: epoch %u waits for one to join", C.s.epoch);
    } else if (n) {
        assign_batches(ids, n, true);
        kd_log(KD_LOG_INFO, "COORD-REASSIGN",
               "teacher %s is gone: its %zu unapplied batch(es) of epoch %u go to %d live "
               "teacher node(s)",
               gone->node_id, n, C.s.epoch, live_count(KDIST__ROLE__TEACHER));
    }
    free(ids);
}

/* Asks the teachers for every unapplied batch of the epoch again. A teacher streams the ones
 * still in its queue once (it merges the lists); the ones streamed but not pushed back come
 * again, and if the first copy was only late the ledger drops the second. */
static void restream_unapplied(const char *why) {
    if (C.phase != RUN_RUNNING || !C.assigned) return;
    uint32_t *ids = kd_xmalloc((C.n_batches ? C.n_batches : 1) * sizeof *ids);
    size_t n = unapplied_batches(ids);
    if (n) {
        kd_log(KD_LOG_WARN, "COORD-RESTREAM",
               "%s: asking for the %zu unapplied batch(es) of "
               "epoch %u again",
               why, n, C.s.epoch);
        assign_batches(ids, n, true);
        C.s.restreamed += (long)n;
    }
    free(ids);
    C.last_progress = kd_now();
}

/* Streamed batches that never came back: their worker died unseen, or a queue was lost. */
static void restream_stalled(void) {
    if (kd_now() - C.last_progress < C.r.cluster.restream_timeout_ms / 1000.0) return;
    char why[96];
    snprintf(why, sizeof why, "no batch applied for %.1f s", kd_now() - C.last_progress);
    restream_unapplied(why);
}

/* ---- evaluation, metrics, checkpoints ---------------------------------------------------- */

static void flush_metrics(long step) {
    char err[KD_ERR_LEN];
    if (kd_metrics_flush(C.metrics, step, err, sizeof err) != 0)
        kd_log(KD_LOG_ERROR, "COORD-METRICS", "%s", err);
}

static void request_eval(void) {
    evaluator_request(C.eval, C.model->params, C.s.step);
    C.last_eval_step = C.s.step;
}

static void handle_eval_result(const eval_result_t *res) {
    C.last_eval = *res;
    C.have_eval = true;
    C.s.best_val_accuracy = res->best_val_accuracy;
    C.s.best_step = res->best_step;
    C.s.evals_since_best = res->evals_since_best;
    kd_metrics_scalar(C.metrics, "eval/val_accuracy", res->val.accuracy);
    kd_metrics_scalar(C.metrics, "eval/val_loss", res->val.loss);
    kd_metrics_scalar(C.metrics, "eval/test_accuracy", res->test.accuracy);
    kd_metrics_scalar(C.metrics, "eval/test_loss", res->test.loss);
    if (!isnan(res->test.agreement)) {
        kd_metrics_scalar(C.metrics, "eval/val_teacher_agreement", res->val.agreement);
        kd_metrics_scalar(C.metrics, "eval/val_teacher_kl", res->val.teacher_kl);
        kd_metrics_scalar(C.metrics, "eval/test_teacher_agreement", res->test.agreement);
        kd_metrics_scalar(C.metrics, "eval/test_teacher_kl", res->test.teacher_kl);
    }
    flush_metrics(res->step);
    kd_log(KD_LOG_INFO, "COORD-EVAL", "step %ld: val accuracy %.4f (loss %.4f), test %.4f%s",
           res->step, res->val.accuracy, res->val.loss, res->test.accuracy,
           res->improved ? " (best)" : "");
    if (C.phase == RUN_RUNNING && C.r.eval.patience > 0 &&
        res->evals_since_best >= C.r.eval.patience) {
        kd_log(KD_LOG_INFO, "COORD-EARLY-STOP",
               "no validation improvement in %d evaluations: stopping (best step %ld)",
               res->evals_since_best, res->best_step);
        C.status = "early_stopped";
        C.phase = RUN_FINISHING;
    }
}

static void save_checkpoint(void) {
    char err[KD_ERR_LEN];
    C.s.elapsed = elapsed();
    C.t0 = kd_now();
    if (C.weights_poisoned) return; /* the last finite checkpoint stays the newest */
    if (coord_checkpoint_save(C.ckpt_dir, &C.s, C.model, C.opt, C.applied, C.n_batches,
                              C.r.checkpoint.keep, err, sizeof err) != 0)
        kd_log(KD_LOG_ERROR, "COORD-CKPT-FAIL", "%s", err);
    C.last_ckpt_step = C.s.step;
}

static void write_metrics(void) {
    double now = kd_now(), dt = now - C.win_t0;
    if (C.win_pushes == 0) return;
    kd_metrics_scalar(C.metrics, "train/loss", C.win_loss / (double)C.win_samples);
    kd_metrics_scalar(C.metrics, "train/accuracy", (double)C.win_correct / (double)C.win_samples);
    kd_metrics_scalar(C.metrics, "train/lr", kd_schedule_lr(&C.sched, C.s.position));
    kd_metrics_scalar(C.metrics, "train/samples_per_sec", dt > 0 ? C.win_samples / dt : 0.0);
    kd_metrics_scalar(C.metrics, "cluster/workers", live_count(KDIST__ROLE__WORKER));
    kd_metrics_scalar(C.metrics, "cluster/teachers", live_count(KDIST__ROLE__TEACHER));
    kd_metrics_scalar(C.metrics, "cluster/staleness", C.win_staleness / (double)C.win_pushes);
    kd_metrics_scalar(C.metrics, "ledger/duplicates_dropped", (double)C.s.duplicates);
    kd_metrics_scalar(C.metrics, "ledger/restreamed", (double)C.s.restreamed);
    kd_metrics_scalar(C.metrics, "ledger/messages_dropped", (double)C.messages_dropped);
    kd_metrics_scalar(C.metrics, "ledger/connections_refused", (double)C.connections_refused);
    kd_metrics_scalar(C.metrics, "memory/coordinator", (double)kd_node_rss_bytes());
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &C.members[i];
        if (!m->used || m->role == KDIST__ROLE__CLIENT || !m->rss_bytes) continue;
        char tag[128];
        snprintf(tag, sizeof tag, "memory/%s-%s", role_name(m->role), m->node_id);
        kd_metrics_scalar(C.metrics, tag, (double)m->rss_bytes);
    }
    static const char *const phases[4] = {"wait_batch", "compute", "push", "wait_weights"};
    for (int p = 0; p < 4; p++) {
        char tag[64];
        snprintf(tag, sizeof tag, "time/phase/%s", phases[p]);
        kd_metrics_scalar(C.metrics, tag, C.win_phase[p] / (double)C.win_pushes);
    }
    for (int l = 0; l < C.model->n_layers; l++) {
        char tag[96];
        const char *kind = kd_layer_kind_name(C.model->layers[l].spec.kind);
        snprintf(tag, sizeof tag, "time/layer%d_%s/forward", l, kind);
        kd_metrics_scalar(C.metrics, tag, C.win_layer_fwd[l] / (double)C.win_pushes);
        snprintf(tag, sizeof tag, "time/layer%d_%s/backward", l, kind);
        kd_metrics_scalar(C.metrics, tag, C.win_layer_bwd[l] / (double)C.win_pushes);
    }
    flush_metrics(C.s.step);
    C.win_t0 = now;
    C.win_loss = C.win_staleness = 0;
    C.win_samples = C.win_correct = C.win_pushes = C.win_steps = 0;
    memset(C.win_phase, 0, sizeof C.win_phase);
    memset(C.win_layer_fwd, 0, sizeof(double) * (size_t)C.model->n_layers);
    memset(C.win_layer_bwd, 0, sizeof(double) * (size_t)C.model->n_layers);
}

static void finish(const char *status) {
    if (C.phase == RUN_FINISHING) return;
    C.status = status;
    C.phase = RUN_FINISHING;
}

/* The run cannot go on: it ends "failed" with the reason in the log and summary.json. */
static void fail_run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail_run(const char *fmt, ...) {
    if (C.fail_reason[0]) return; /* the first cause is the one to fix */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(C.fail_reason, sizeof C.fail_reason, fmt, ap);
    va_end(ap);
    kd_log(KD_LOG_ERROR, "COORD-RUN-FAILED", "%s", C.fail_reason);
    C.status = "failed";
    C.phase = RUN_FINISHING;
}

/* After every optimizer step: periodic work and the end of the epoch or run. */
static void after_step(void) {
    C.win_steps++;
    if (C.win_steps >= C.r.logging.every_steps) write_metrics();
    if (C.r.eval.every_steps > 0 && C.s.step % C.r.eval.every_steps == 0) request_eval();
    if (C.r.checkpoint.every_steps > 0 && C.s.step % C.r.checkpoint.every_steps == 0)
        save_checkpoint();
    if (C.r.train.max_steps > 0 && C.s.step >= C.r.train.max_steps) {
        finish("completed");
        return;
    }
    if (C.applied_count < C.n_batches) return;
    kd_log(KD_LOG_INFO, "COORD-EPOCH-DONE", "epoch %u complete: %zu/%zu batches applied once",
           C.s.epoch, C.applied_count, C.n_batches);
    if (C.r.eval.every_steps == 0) request_eval();
    if (C.s.epoch + 1 >= (uint32_t)C.r.train.epochs) {
        finish("completed");
        return;
    }
    start_epoch(C.s.epoch + 1);
}

/* ---- applying gradients ------------------------------------------------------------------ */

static void apply_gradient(float *grad, long batches, long samples) {
    kd_optim_step(C.opt, C.model->params, grad, kd_schedule_lr(&C.sched, C.s.position));
    size_t bad = kd_first_nonfinite(C.model->params, C.model->n_params);
    if (bad < C.model->n_params) {
        C.weights_poisoned = true;
        fail_run("the weights became non-finite at step %ld (parameter %zu is %g) from finite "
                 "gradients: the update overflowed; try a lower optim.lr. The weights are not "
                 "saved; the last checkpoint and best/ hold the last finite ones",
                 C.s.step + 1, bad, (double)C.model->params[bad]);
    }
    C.s.position += batches;
    C.s.step++;
    C.s.version++;
    invalidate_weights();
    C.last_progress = C.last_apply = kd_now();
    C.samples_applied += samples;
}

/* Samples per second of training, from the first push to the last update. */
static double train_rate(void) {
    double dt = C.last_apply - C.first_push;
    return C.first_push > 0 && dt > 0 ? (double)C.samples_applied / dt : 0.0;
}

static void mark_applied(const Kdist__BatchRef *ref) {
    C.applied[ref->batch_id] = 1;
    C.in_step[ref->batch_id] = 0;
    C.applied_count++;
    C.s.batches_applied++;
}

/* Accounts a push's statistics into the metrics window and the worker's rate. */
static void account_push(member_t *m, const Kdist__PushGradient *p) {
    C.win_loss += p->loss_sum;
    C.win_samples += p->samples;
    C.win_correct += p->correct;
    C.win_pushes++;
    C.win_staleness += (double)(C.s.version - p->base_version);
    for (size_t i = 0; i < p->n_phase_seconds && i < 4; i++) C.win_phase[i] += p->phase_seconds[i];
    for (size_t i = 0; i < p->n_layer_forward_seconds && (int)i < C.model->n_layers; i++)
        C.win_layer_fwd[i] += p->layer_forward_seconds[i];
    for (size_t i = 0; i < p->n_layer_backward_seconds && (int)i < C.model->n_layers; i++)
        C.win_layer_bwd[i] += p->layer_backward_seconds[i];
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

static bool sync_step_ready(void) {
    if (C.step_count == 0) return false;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &C.members[i];
        if (!m->used || m->role != KDIST__ROLE__WORKER) continue;
        if (m->state != WORKER_PUSHED && !m->waiting_for_batch) return false;
    }
    return true;
}

/* Closes the open sync step: one update from the samples-weighted mean of its gradients. */
static void close_sync_step(void) {
    const size_t n = C.model->n_params;
    float *grad;
    if (C.step_count == 1) {
        grad = C.step_grads[0];
    } else {
        double total = 0;
        for (int k = 0; k < C.step_count; k++) total += C.step_msgs[k].env->push->samples;
        KD_ASSERT(total > 0);
        memset(C.step_grad, 0, n * sizeof(float));
        for (int k = 0; k < C.step_count; k++) {
            const float *g = C.step_grads[k];
            float w = (float)(C.step_msgs[k].env->push->samples / total);
            for (size_t i = 0; i < n; i++) C.step_grad[i] += w * g[i];
        }
        grad = C.step_grad;
    }
    long samples = 0;
    for (int k = 0; k < C.step_count; k++) samples += C.step_msgs[k].env->push->samples;
    apply_gradient(grad, C.step_count, samples);
    for (int k = 0; k < C.step_count; k++) {
        mark_applied(C.step_msgs[k].env->push->ref);
        kd_msg_close(&C.step_msgs[k]);
        free(C.step_copies[k]);
        C.step_copies[k] = NULL;
    }
    int count = C.step_count;
    C.step_count = 0;
    for (int k = 0; k < count; k++) {
        member_t *m = &C.members[C.step_member[k]];
        if (m->used && m->state == WORKER_PUSHED) send_weights(m, go_on());
    }
    after_step();
    /* the end of the run is known only now: tell the collected workers */
    if (C.phase == RUN_FINISHING)
        for (int k = 0; k < count; k++) {
            member_t *m = &C.members[C.step_member[k]];
            if (m->used && m->state == WORKER_COMPUTING) send_weights(m, REPLY_STOP);
        }
}

/* SSP: a worker may go on while it is at most `staleness` clocks ahead of the slowest. */
static uint64_t min_clock(void) {
    uint64_t lo = UINT64_MAX;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &C.members[i];
        if (m->used && m->role == KDIST__ROLE__WORKER && !m->waiting_for_batch && m->clock < lo)
            lo = m->clock;
    }
    return lo;
}

static void release_held_workers(void) {
    uint64_t lo = min_clock();
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &C.members[i];
        if (m->used && m->role == KDIST__ROLE__WORKER && m->state == WORKER_HELD &&
            (lo == UINT64_MAX || m->clock <= lo + (uint64_t)C.r.cluster.staleness))
            send_weights(m, go_on());
    }
}

/* Why a gradient must not reach the optimizer (true, with why set): a non-finite loss or value,
 * or a norm beyond cluster.max_gradient_norm. One pass in double, so huge values do not
 * overflow the sum. */
static bool gradient_problem(const float *grad, const Kdist__PushGradient *p, char *why,
                             size_t whylen) {
    if (!isfinite(p->loss_sum)) {
        kd_err(why, whylen, "its loss is %g", p->loss_sum);
        return true;
    }
    double sum = 0;
    for (size_t i = 0; i < C.model->n_params; i++) sum += (double)grad[i] * (double)grad[i];
    if (!isfinite(sum)) {
        size_t bad = kd_first_nonfinite(grad, C.model->n_params);
        kd_err(why, whylen, "gradient value %zu is %g", bad,
               bad < C.model->n_params ? (double)grad[bad] : sum);
        return true;
    }
    const double bound = C.r.cluster.max_gradient_norm;
    if (bound > 0 && sqrt(sum) > bound) {
        kd_err(why, whylen, "its norm %.4g exceeds cluster.max_gradient_norm %.4g", sqrt(sum),
               bound);
        return true;
    }
    return false;
}

/* The batch of a rejected or refused push goes back to its teacher (it was never applied). */
static void requeue_batch(const Kdist__BatchRef *ref) {
    if (C.phase != RUN_RUNNING || !C.assigned || !ref || ref->epoch != C.s.epoch ||
        ref->batch_id >= C.n_batches || C.applied[ref->batch_id] || C.in_step[ref->batch_id])
        return;
    uint32_t id = ref->batch_id;
    assign_batches(&id, 1, true);
    C.s.restreamed++;
}

static void remove_member(member_t *m, const char *event);

/* A member that keeps sending unusable gradients while others' are applied is removed and may
 * not come back under its key. */
static void evict_member(member_t *m, const char *why) {
    C.evicted++;
    kd_log(KD_LOG_WARN, "COORD-EVICT",
           "%s %s (%s) evicted: %ld gradients in a row rejected, the "
           "last because %s",
           role_name(m->role), m->node_id, m->host, m->rejected_in_a_row, why);
    if (m->curve_key[0] &&
        C.n_evicted_keys < (int)(sizeof C.evicted_keys / sizeof C.evicted_keys[0]))
        snprintf(C.evicted_keys[C.n_evicted_keys++], sizeof C.evicted_keys[0], "%s", m->curve_key);
    char reason[KD_ERR_LEN + 64];
    snprintf(reason, sizeof reason, "evicted: its gradients were rejected (%s)", why);
    send_refused(m->rid, m->rid_len, KDIST__REFUSAL_CODE__EVICTED, reason);
    remove_member(m, "evicted");
}

/* A gradient collected into a sync step or applied: the rejection streaks end. */
static void accept_push(member_t *m) {
    C.pushes_accepted++;
    C.rejected_in_a_row = 0;
    m->rejected_in_a_row = 0;
}

/* A gradient that failed gradient_problem: counted, never applied; its batch goes back to the
 * queue. A member whose streak goes on while others' gradients are applied is evicted; a
 * streak across the whole cluster (training diverged) fails the run. */
static void reject_push(member_t *m, const Kdist__BatchRef *ref, const char *why) {
    C.gradients_rejected++;
    C.rejected_in_a_row++;
    if (m->rejected_in_a_row++ == 0) m->accepted_at_first_rejection = C.pushes_accepted;
    if (kd_log_allow(&C.drop_limit, 1.0))
        kd_log(KD_LOG_WARN, "COORD-GRADIENT-REJECTED",
               "gradient of batch %u/%u from %s %s rejected: %s (%ld rejected so far)", ref->epoch,
               ref->batch_id, role_name(m->role), m->node_id, why, C.gradients_rejected);
    requeue_batch(ref);
    if (C.rejected_in_a_row >= C.r.cluster.fail_after) {
        send_weights(m, REPLY_DROPPED);
        fail_run("the last %ld gradients pushed were all rejected (the last because %s): the "
                 "training diverged or every worker is broken; try a lower optim.lr or "
                 "optim.clip_norm",
                 C.rejected_in_a_row, why);
        return;
    }
    if (m->rejected_in_a_row >= C.r.cluster.evict_after &&
        C.pushes_accepted > m->accepted_at_first_rejection) {
        evict_member(m, why);
        return;
    }
    send_weights(m, REPLY_DROPPED);
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
static void on_nack(member_t *m, kd_msg_t *msg) {
    const Kdist__Nack *n = msg->env->nack;
    const Kdist__BatchRef *ref = n->ref;
    if (!ref || ref->batch_id >= C.n_batches) {
        drop(msg, "nack for a batch that does not exist");
        return;
    }
    C.nacks++;
    const char *detail = n->detail && n->detail[0] ? n->detail : "no detail";
    if (ref->epoch != C.s.epoch || C.applied[ref->batch_id] || C.phase != RUN_RUNNING) return;
    uint32_t times = ++C.nacked[ref->batch_id];
    kd_log(KD_LOG_WARN, "COORD-NACK", "worker %s cannot use batch %u/%u (%s: %s): time %u of %ld",
           m->node_id, ref->epoch, ref->batch_id, nack_reason_name(n->reason), detail, times,
           C.r.cluster.max_nacks);
    if ((long)times >= C.r.cluster.max_nacks) {
        fail_run("batch %u/%u was refused %u times by workers because of %s (%s): fix the data or "
                 "the teacher, or raise cluster.max_nacks",
                 ref->epoch, ref->batch_id, times, nack_reason_name(n->reason), detail);
        return;
    }
    requeue_batch(ref);
}

static void on_push(member_t *m, kd_msg_t *msg) {
    const Kdist__PushGradient *p = msg->env->push;
    char err[KD_ERR_LEN];
    note_weights_held(m, p->base_version);
    float *grad = p->ref ? push_gradient(m, msg, err, sizeof err) : NULL;
    if (!grad) {
        drop(msg, p->ref ? err : "push without a batch reference");
        send_weights(m, REPLY_DROPPED); /* a member is never left without an answer */
        return;
    }
    if (p->samples == 0 || p->samples > (uint32_t)C.r.train.batch_size || p->correct > p->samples) {
        drop(msg, "push with impossible counters");
        send_weights(m, REPLY_DROPPED); /* a member is never left without an answer */
        return;
    }
    m->waiting_for_batch = false;
    if (C.phase == RUN_FINISHING) {
        send_weights(m, REPLY_STOP);
        return;
    }
    if (gradient_problem(grad, p, err, sizeof err)) {
        reject_push(m, p->ref, err);
        return;
    }
    if (C.first_push == 0) C.first_push = kd_now();
    const Kdist__BatchRef *ref = p->ref;
    bool past = ref->epoch < C.s.epoch;
    if (ref->batch_id >= C.n_batches || ref->epoch >= (uint32_t)C.r.train.epochs) {
        drop(msg, "push for a batch that does not exist");
        send_weights(m, REPLY_DROPPED);
        return;
    }
    /* Computed on weights or batches this coordinator never handed out — the worker was
     * ahead of the checkpoint a restarted coordinator resumed from: dropped, not counted;
     * the batch comes again when its epoch does. */
    if (ref->epoch > C.s.epoch || p->base_version > C.s.version) {
        C.stale_dropped++;
        send_weights(m, REPLY_DROPPED);
        return;
    }
    if (past || C.applied[ref->batch_id] || C.in_step[ref->batch_id]) {
        C.s.duplicates++;
        kd_log(KD_LOG_INFO, "COORD-DUPLICATE", "batch %u/%u from %s-%s already counted: dropped",
               ref->epoch, ref->batch_id, role_name(m->role), m->node_id);
        send_weights(m, REPLY_DROPPED);
        return;
    }
    switch (C.r.cluster.consistency) {
    case KD_CONSISTENCY_SYNC:
        if (m->state == WORKER_PUSHED) { /* one batch per worker per step: it awaits the close */
            drop(msg, "a second push in one sync step");
            return;
        }
        if (p->base_version < C.s.version) { /* its step closed without it: same batch again */
            send_weights(m, REPLY_REDO);
            return;
        }
        if (C.step_count == COORD_MAX_MEMBERS) close_sync_step(); /* churn cannot overflow it */
        accept_push(m);
        account_push(m, p);
        C.in_step[ref->batch_id] = 1;
        C.step_member[C.step_count] = (int)(m - C.members);
        C.step_grads[C.step_count] = grad;
        kd_msg_move(&C.step_msgs[C.step_count++], msg); /* the step owns it now */
        m->state = WORKER_PUSHED;
        m->clock++;
        if (sync_step_ready()) close_sync_step();
        return;
    case KD_CONSISTENCY_ASYNC:
    case KD_CONSISTENCY_SSP:
        accept_push(m);
        account_push(m, p);
        apply_gradient(grad, 1, p->samples);
        mark_applied(ref);
        m->clock++;
        bool hold = C.r.cluster.consistency == KD_CONSISTENCY_SSP && min_clock() != UINT64_MAX &&
                    m->clock > min_clock() + (uint64_t)C.r.cluster.staleness;
        send_weights(m, hold ? REPLY_WAIT : REPLY_WEIGHTS);
        after_step();
        if (C.r.cluster.consistency == KD_CONSISTENCY_SSP) release_held_workers();
        if (C.phase == RUN_FINISHING && m->state == WORKER_COMPUTING) send_weights(m, REPLY_STOP);
        return;
    }
}

/* ---- membership -------------------------------------------------------------------------- */

/* The stream endpoints of the live teacher nodes and, under CurveZMQ, their public keys
 * (borrowed strings; keys may be NULL); returns the count. */
static size_t teacher_endpoints(char **out, char **keys) {
    size_t n = 0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (C.members[i].used && C.members[i].role == KDIST__ROLE__TEACHER) {
            if (keys) keys[n] = C.members[i].curve_key;
            out[n++] = C.members[i].stream_endpoint;
        }
    return n;
}

static void send_welcome(member_t *m) {
    char spec[2048];
    kd_model_describe(C.model, spec, sizeof spec);
    char *yaml = kd_recipe_to_yaml(&C.r);
    char *endpoints[COORD_MAX_MEMBERS], *keys[COORD_MAX_MEMBERS];
    size_t n_endpoints = teacher_endpoints(endpoints, keys);
    Kdist__Shape shape = KDIST__SHAPE__INIT;
    shape.c = C.model->input.c;
    shape.h = C.model->input.h;
    shape.w = C.model->input.w;
    Kdist__Welcome w = KDIST__WELCOME__INIT;
    w.run_id = C.s.run_id;
    w.recipe_yaml = yaml;
    w.model_spec = spec;
    w.input = &shape;
    w.num_classes = (uint32_t)C.model->num_classes;
    w.weights_version = C.s.version;
    w.n_teacher_endpoints = n_endpoints;
    w.teacher_endpoints = endpoints;
    if (C.r.cluster.security.curve) {
        w.n_teacher_keys = n_endpoints;
        w.teacher_keys = keys;
    }
    w.heartbeat_ms = (uint32_t)C.r.cluster.heartbeat_ms;
    w.n_params = C.model->n_params;
    Kdist__SharedMemory offer = KDIST__SHARED_MEMORY__INIT;
    if (offer_shared_memory(m, &offer)) w.shared_memory = &offer;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_WELCOME;
    env.welcome = &w;
    kd_wire_tensor_t t = weights_tensor();
    send_to(m, &env, &t, m->role == KDIST__ROLE__WORKER ? 1 : 0);
    free(yaml);
}

static void send_peers(void) {
    char *endpoints[COORD_MAX_MEMBERS], *keys[COORD_MAX_MEMBERS];
    size_t n = teacher_endpoints(endpoints, keys);
    Kdist__Peers p = KDIST__PEERS__INIT;
    p.n_teacher_endpoints = n;
    p.teacher_endpoints = endpoints;
    if (C.r.cluster.security.curve) {
        p.n_teacher_keys = n;
        p.teacher_keys = keys;
    }
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_PEERS;
    env.peers = &p;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (C.members[i].used && C.members[i].role == KDIST__ROLE__WORKER)
            send_to(&C.members[i], &env, NULL, 0);
}

static void remove_member(member_t *m, const char *event) {
    kd_log(KD_LOG_INFO, "COORD-MEMBER-GONE", "%s %s (%s) %s", role_name(m->role), m->node_id,
           m->host, event);
    if (m->role != KDIST__ROLE__CLIENT) add_event(event, role_name(m->role), m->node_id);
    if (m->role != KDIST__ROLE__CLIENT &&
        (strcmp(event, "dead") == 0 || strcmp(event, "evicted") == 0) &&
        C.n_lost++ < COORD_MAX_LOST)
        C.lost[C.n_lost - 1] = C.events[C.n_events - 1];
    /* a sync step never waits for a worker that is gone; its collected gradient still counts */
    keep_step_gradients(m);
    release_slot(m);
    kd_shm_close(&m->grad_shm);
    if (m->role == KDIST__ROLE__TEACHER) add_teacher_counters(&C.teachers_gone, m);
    m->used = false;
    if (C.phase != RUN_RUNNING) return;
    if (m->role == KDIST__ROLE__WORKER) {
        if (C.r.cluster.consistency == KD_CONSISTENCY_SYNC && sync_step_ready()) close_sync_step();
        if (C.r.cluster.consistency == KD_CONSISTENCY_SSP) release_held_workers();
        /* the batch in its hands and those queued in its socket are gone with it */
        char why[160];
        snprintf(why, sizeof why, "worker %s %s", m->node_id,
                 strcmp(event, "dead") == 0 ? "died" : "left");
        restream_unapplied(why);
    } else if (m->role == KDIST__ROLE__TEACHER) {
        reassign_share(m);
        send_peers();
    }
}

static void on_hello(kd_msg_t *msg) {
    const Kdist__Hello *h = msg->env->hello;
    if (h->role != KDIST__ROLE__WORKER && h->role != KDIST__ROLE__TEACHER) {
        send_refused(msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__BAD_HELLO,
                     "only workers and teacher nodes say hello");
        drop(msg, "hello from an unexpected role");
        return;
    }
    if (h->run_id[0] && strcmp(h->run_id, C.s.run_id) != 0) {
        char reason[256];
        snprintf(reason, sizeof reason, "this coordinator runs '%s', not '%s'", C.s.run_id,
                 h->run_id);
        send_refused(msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__WRONG_RUN, reason);
        return;
    }
    if (!h->node_id[0] || strlen(h->node_id) >= sizeof C.members[0].node_id ||
        (h->role == KDIST__ROLE__TEACHER &&
         (!h->stream_endpoint[0] || strlen(h->stream_endpoint) >= 256))) {
        send_refused(msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__BAD_HELLO,
                     "hello needs a node id (and a teacher endpoint)");
        drop(msg, "hello with a missing or oversized field");
        return;
    }
    if (C.curve && !kd_curve_role_has(&C.keys, KD_CURVE_MEMBER, msg->user_id) &&
        !kd_curve_role_has(&C.keys,
                           h->role == KDIST__ROLE__WORKER ? KD_CURVE_WORKER : KD_CURVE_TEACHER,
                           msg->user_id)) {
        char reason[256];
        snprintf(reason, sizeof reason,
                 "key %s may not join as a %s: list it in cluster.security.%s or authorized_keys",
                 msg->user_id, role_name(h->role),
                 h->role == KDIST__ROLE__WORKER ? "worker_keys" : "teacher_keys");
        send_refused(msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__NOT_AUTHORIZED, reason);
        C.hellos_refused++;
        drop(msg, "hello from a key without that role");
        return;
    }
    for (int i = 0; i < C.n_evicted_keys; i++)
        if (msg->user_id[0] && strcmp(C.evicted_keys[i], msg->user_id) == 0) {
            send_refused(msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__EVICTED,
                         "this key was evicted from the run");
            drop(msg, "hello from an evicted key");
            return;
        }
    if (C.phase != RUN_RUNNING) {
        send_refused(msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__RUN_FINISHING,
                     "the run is finishing");
        return;
    }
    /* A node id belongs to one live connection. A second Hello for it replaces the holder only
     * when the holder's connection is gone (a killed node's socket closes at once, and libzmq
     * then refuses to route to it); a live holder keeps its place and the newcomer is refused,
     * so nobody can evict a member by claiming its id. The holder's own re-Hello is a restart. */
    bool restart = false;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *old = &C.members[i];
        if (!old->used || old->role != h->role || strcmp(old->node_id, h->node_id) != 0) continue;
        bool same_connection =
            old->rid_len == msg->peer_len && memcmp(old->rid, msg->peer, msg->peer_len) == 0;
        if (!same_connection && member_reachable(old)) {
            char reason[160];
            snprintf(reason, sizeof reason, "%s %s is live on another connection",
                     role_name(h->role), h->node_id);
            send_refused(msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__ID_IN_USE, reason);
            C.hellos_refused++;
            return;
        }
        remove_member(old, "restart");
        restart = true;
    }
    member_t *m = find_member(msg->peer, msg->peer_len);
    if (m) remove_member(m, "restart");
    for (int i = 0; i < COORD_MAX_MEMBERS && !m; i++)
        if (!C.members[i].used) m = &C.members[i];
    if (!m) {
        send_refused(msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__TOO_MANY_MEMBERS,
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
    uint64_t lo = min_clock();
    m->clock = lo == UINT64_MAX ? 0 : lo;
    kd_log(KD_LOG_INFO, "COORD-MEMBER-JOIN", "%s %s joined from %s (pid %u, incarnation %llu)",
           role_name(m->role), m->node_id, m->host, m->pid, (unsigned long long)m->incarnation);
    if (!restart) /* a restart was recorded as the old one left */
        add_event("join", role_name(m->role), m->node_id);
    send_welcome(m);
    if (m->role == KDIST__ROLE__WORKER) {
        int w = live_count(KDIST__ROLE__WORKER);
        if (w > C.workers_max) C.workers_max = w;
    } else {
        send_peers();
        /* The first Assign waits (briefly) for the recipe's teacher nodes, so nodes started
         * together share the epoch instead of the first one taking it all. */
        if (!C.assigned && live_count(KDIST__ROLE__TEACHER) >= C.r.cluster.teachers)
            assign_epoch();
        else if (!C.assigned && C.assign_at == 0)
            C.assign_at = kd_now() + TEACHER_GATHER_SECONDS;
    }
}

static void on_heartbeat(member_t *m, const Kdist__Heartbeat *hb) {
    if (hb->rss_bytes) m->rss_bytes = hb->rss_bytes;
    m->messages_dropped = hb->messages_dropped;
    m->connections_refused = hb->connections_refused;
    if (hb->teacher) {
        m->forward_samples = hb->teacher->forward_samples;
        m->cache_hits = hb->teacher->cache_hits;
        m->cache_misses = hb->teacher->cache_misses;
        m->cache_corrupt = hb->teacher->cache_corrupt;
        /* a teacher still filling its logit table is busy, not stalled: no restream yet */
        if (hb->teacher->filling) C.last_progress = kd_now();
    }
    m->batches_streamed = hb->batches_streamed;
    if (m->role != KDIST__ROLE__WORKER) return;
    bool was_idle = m->waiting_for_batch;
    m->waiting_for_batch = hb->waiting_for_batch && m->state == WORKER_COMPUTING;
    if (m->waiting_for_batch && !was_idle) {
        if (C.r.cluster.consistency == KD_CONSISTENCY_SYNC && sync_step_ready()) close_sync_step();
        if (C.r.cluster.consistency == KD_CONSISTENCY_SSP) release_held_workers();
    }
}

/* ---- status ------------------------------------------------------------------------------ */

/* The teacher nodes' logit work over the run: forward passes and cache blocks. */
static json_t *teacher_work_json(void) {
    member_t sum = C.teachers_gone;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (C.members[i].used && C.members[i].role == KDIST__ROLE__TEACHER)
            add_teacher_counters(&sum, &C.members[i]);
    return json_pack("{s:I, s:I, s:I, s:I}", "forward_samples", (json_int_t)sum.forward_samples,
                     "cache_hits", (json_int_t)sum.cache_hits, "cache_misses",
                     (json_int_t)sum.cache_misses, "cache_corrupt", (json_int_t)sum.cache_corrupt);
}

static json_t *status_json(void) {
    double t = elapsed();
    long total = kd_train_total_steps(&C.r, C.data.train->n);
    double done = total > 0 ? (double)C.s.position / (double)total : 0.0;
    double rate = train_rate();
    json_t *j = json_pack(
        "{s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:o, s:o, s:o}",
        "run_id", C.s.run_id, "name", C.r.name, "status",
        C.phase == RUN_RUNNING ? "running" : (C.status ? C.status : "finishing"), "epoch",
        (json_int_t)C.s.epoch, "epochs", (json_int_t)C.r.train.epochs, "step",
        (json_int_t)C.s.position, "total_steps", (json_int_t)total, "version",
        (json_int_t)C.s.version, "batches_applied", (json_int_t)C.s.batches_applied,
        "batches_expected", (json_int_t)C.s.batches_expected, "duplicates_dropped",
        (json_int_t)C.s.duplicates, "restreamed", (json_int_t)C.s.restreamed, "messages_dropped",
        (json_int_t)C.messages_dropped, "samples_per_sec", kd_json_number(rate), "elapsed",
        kd_json_number(t), "eta", kd_json_number(done > 0 ? t * (1.0 - done) / done : 0.0));
    /* step/total_steps count batches (the schedule's clock), so progress does not depend on
     * how many batches a sync step averages; updates counts optimizer steps. */
    json_object_set_new(j, "updates", json_integer(C.s.step));
    json_object_set_new(j, "stale_dropped", json_integer(C.stale_dropped));
    json_object_set_new(j, "connections_refused", json_integer(C.connections_refused));
    json_object_set_new(j, "teacher", teacher_work_json());
    json_object_set_new(j, "gradients_rejected", json_integer(C.gradients_rejected));
    json_object_set_new(j, "nacks", json_integer(C.nacks));
    json_object_set_new(j, "members_evicted", json_integer(C.evicted));
    json_object_set_new(j, "hellos_refused", json_integer(C.hellos_refused));
    json_object_set_new(j, "control_refused", json_integer(C.control_refused));
    if (C.fail_reason[0]) json_object_set_new(j, "error", json_string(C.fail_reason));
    json_object_set_new(j, "lr", kd_json_number(kd_schedule_lr(&C.sched, C.s.position)));
    if (C.win_samples) {
        json_object_set_new(j, "loss", kd_json_number(C.win_loss / (double)C.win_samples));
        json_object_set_new(j, "train_accuracy",
                            kd_json_number((double)C.win_correct / (double)C.win_samples));
    }
    if (C.have_eval) {
        json_object_set_new(j, "val_accuracy", kd_json_number(C.last_eval.val.accuracy));
        json_object_set_new(j, "test_accuracy", kd_json_number(C.last_eval.test.accuracy));
    }
    json_t *members = json_array();
    double now = kd_now();
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &C.members[i];
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
    for (int i = 0; i < C.n_events; i++)
        json_array_append_new(events, json_pack("{s:o, s:s, s:s, s:s}", "time",
                                                kd_json_number(C.events[i].time), "event",
                                                C.events[i].event, "role", C.events[i].role, "id",
                                                C.events[i].id));
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
static bool control_allowed(const kd_msg_t *msg, control_origin_t from) {
    if (from == FROM_LOCAL_CHANNEL) return true;
    if (msg->env->control->kind == KDIST__CONTROL__KIND__STATUS) return true;
    return C.curve && kd_curve_role_has(&C.keys, KD_CURVE_OPERATOR, msg->user_id);
}

static void on_control(kd_msg_t *msg, control_origin_t from) {
    const Kdist__Control *c = msg->env->control;
    void *reply_sock = from == FROM_LOCAL_CHANNEL ? C.control : C.router;
    if (!control_allowed(msg, from)) {
        C.control_refused++;
        char peer[300], reason[KD_PATH_MAX + 512];
        kd_msg_peer_text(msg, peer, sizeof peer);
        snprintf(reason, sizeof reason,
                 "'%s' is not allowed from %s: control commands come over the run directory's "
                 "control channel (%s) or from a key in cluster.security.operator_keys",
                 control_kind_name(c->kind), msg->user_id[0] ? "this key" : "the network",
                 C.control_endpoint);
        if (kd_log_allow(&C.drop_limit, 1.0))
            kd_log(KD_LOG_WARN, "COORD-CONTROL-REFUSED", "%s from '%s' refused (%ld so far)",
                   control_kind_name(c->kind), peer, C.control_refused);
        kd_wire_send_refused(reply_sock, msg->peer, msg->peer_len,
                             KDIST__REFUSAL_CODE__NOT_AUTHORIZED, reason);
        return;
    }
    switch (c->kind) {
    case KDIST__CONTROL__KIND__STATUS: {
        json_t *j = status_json();
        char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        if (!text) {
            drop(msg, "cannot encode the status");
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
        finish("stopped");
        return;
    case KDIST__CONTROL__KIND__CHECKPOINT_NOW:
        save_checkpoint();
        return;
    case KDIST__CONTROL__KIND__DRAIN:
        for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
            member_t *m = &C.members[i];
            if (m->used && m->role == KDIST__ROLE__WORKER && strcmp(m->node_id, c->target) == 0) {
                m->drain = true;
                kd_log(KD_LOG_INFO, "COORD-DRAIN", "worker %s will stop after its step",
                       m->node_id);
                if (m->state != WORKER_PUSHED) send_weights(m, REPLY_STOP);
            }
        }
        return;
    default:
        drop(msg, "unknown control kind");
        return;
    }
}

/* ---- the local control channel ------------------------------------------------------------ */

/* Binds the control ROUTER at ipc://<run_dir>/control/coordinator.ipc (the directory 0700, so
 * only the run's owner connects), or in a private /tmp/kdist-control-* directory when that path
 * is too long for a socket address, and names it in <run_dir>/coordinator.control. */
static int setup_control_channel(char *err, size_t errlen) {
    char abs[PATH_MAX];
    if (!realpath(C.run_dir, abs)) return kd_err(err, errlen, "%s: %s", C.run_dir, strerror(errno));
    if (strlen(abs) + 16 > sizeof C.control_dir)
        return kd_err(err, errlen, "%s: the run directory's path is too long", abs);
    memcpy(C.control_dir, abs, strlen(abs));
    memcpy(C.control_dir + strlen(abs), "/control", sizeof "/control");
    const size_t sun_path_max = sizeof(((struct sockaddr_un *)0)->sun_path) - 1;
    if (strlen(C.control_dir) + strlen("/coordinator.ipc") > sun_path_max) {
        snprintf(C.control_dir, sizeof C.control_dir, "/tmp/kdist-control-XXXXXX");
        if (!mkdtemp(C.control_dir)) /* mkdtemp makes it 0700 */
            return kd_err(err, errlen, "cannot create %s: %s", C.control_dir, strerror(errno));
        C.control_dir_temporary = true;
    } else if (mkdir(C.control_dir, 0700) != 0 && errno != EEXIST) {
        return kd_err(err, errlen, "cannot create %s: %s", C.control_dir, strerror(errno));
    }
    struct stat st;
    if (lstat(C.control_dir, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != geteuid() ||
        chmod(C.control_dir, 0700) != 0)
        return kd_err(err, errlen,
                      "%s must be a directory of ours (mode 0700) for the control channel",
                      C.control_dir);
    snprintf(C.control_endpoint, sizeof C.control_endpoint, "ipc://%s/coordinator.ipc",
             C.control_dir);
    unlink(C.control_endpoint + 6); /* a socket file left by a killed coordinator */
    /* No CurveZMQ and no ZAP domain here: the directory's permissions are the authentication. */
    C.control = kd_socket_router_local(C.ctx, C.control_endpoint, err, errlen);
    if (!C.control) return -1;
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/coordinator.control", C.run_dir);
    return kd_write_file_atomic(path, C.control_endpoint, strlen(C.control_endpoint), err, errlen);
}

static void close_control_channel(void) {
    if (C.control) zmq_close(C.control);
    C.control = NULL;
    if (!C.control_endpoint[0]) return;
    unlink(C.control_endpoint + 6);
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/coordinator.control", C.run_dir);
    unlink(path);
    if (C.control_dir_temporary) rmdir(C.control_dir);
}

/* Commands from the control channel: control only (nodes talk on the network socket). */
static void serve_control_channel(void) {
    for (int k = 0; k < 64; k++) {
        kd_msg_t msg;
        char err[KD_ERR_LEN];
        int r = kd_wire_recv(C.control, true, ZMQ_DONTWAIT, &msg, err, sizeof err);
        if (r == KD_WIRE_NONE || r == KD_WIRE_CLOSED) return;
        if (r == KD_WIRE_BAD)
            drop(&msg, err);
        else if (msg.env->body_case == KDIST__ENVELOPE__BODY_CONTROL)
            on_control(&msg, FROM_LOCAL_CHANNEL);
        else
            drop(&msg, "the control channel takes control commands only");
        kd_msg_close(&msg);
    }
}

/* ---- the loop ---------------------------------------------------------------------------- */

static void on_message(kd_msg_t *msg) {
    kd_env_t *env = msg->env;
    if (env->body_case == KDIST__ENVELOPE__BODY_HELLO) {
        on_hello(msg);
        return;
    }
    if (env->body_case == KDIST__ENVELOPE__BODY_CONTROL) {
        on_control(msg, FROM_NETWORK);
        return;
    }
    member_t *m = find_member(msg->peer, msg->peer_len);
    if (!m) {
        send_refused(msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__UNKNOWN_MEMBER,
                     "unknown member: say hello");
        drop(msg, "message from a node that is not a member");
        return;
    }
    if (C.curve && strcmp(msg->user_id, m->curve_key) != 0) { /* a member is bound to its key */
        drop(msg, "a message for a member from another key than the one it joined with");
        return;
    }
    m->last_seen = kd_now();
    switch (env->body_case) {
    case KDIST__ENVELOPE__BODY_HEARTBEAT:
        on_heartbeat(m, env->heartbeat);
        return;
    case KDIST__ENVELOPE__BODY_PUSH:
        if (m->role != KDIST__ROLE__WORKER) break;
        on_push(m, msg);
        return;
    case KDIST__ENVELOPE__BODY_NACK:
        if (m->role != KDIST__ROLE__WORKER) break;
        on_nack(m, msg);
        return;
    case KDIST__ENVELOPE__BODY_GOODBYE:
        m->said_goodbye = true;
        remove_member(m, "leave");
        return;
    default:
        break;
    }
    char why[96];
    snprintf(why, sizeof why, "a %s may not send '%s'", role_name(m->role), kd_wire_body_name(env));
    drop(msg, why);
}

static void heartbeat_and_reap(void) {
    double now = kd_now();
    double hb = C.r.cluster.heartbeat_ms / 1000.0,
           timeout = C.r.cluster.heartbeat_timeout_ms / 1000.0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &C.members[i];
        if (!m->used) continue;
        if (now - m->last_seen > timeout) {
            kd_log(KD_LOG_WARN, "COORD-MEMBER-DEAD", "%s %s silent for %.1f s: declared dead",
                   role_name(m->role), m->node_id, now - m->last_seen);
            remove_member(m, "dead");
            continue;
        }
        if (now - m->last_sent >= hb) {
            Kdist__Heartbeat h = KDIST__HEARTBEAT__INIT;
            kd_env_t env = KDIST__ENVELOPE__INIT;
            env.body_case = KDIST__ENVELOPE__BODY_HEARTBEAT;
            env.heartbeat = &h;
            if (send_to(m, &env, NULL, 0) != 0 && errno == EHOSTUNREACH)
                m->last_sent = now; /* disconnected: the timeout decides */
        }
    }
}

/* The end: stop every node, final evaluation, outputs. */
static void stop_nodes(void) {
    /* A step still open when the run stops is not applied: its batches stay unapplied. */
    for (int k = 0; k < C.step_count; k++) {
        C.in_step[C.step_msgs[k].env->push->ref->batch_id] = 0;
        kd_msg_close(&C.step_msgs[k]);
    }
    C.step_count = 0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &C.members[i];
        if (!m->used) continue;
        if (m->role == KDIST__ROLE__WORKER)
            send_weights(m, REPLY_STOP);
        else if (m->role == KDIST__ROLE__TEACHER)
            send_control(m, KDIST__CONTROL__KIND__STOP);
    }
}

static int write_summary(const eval_result_t *final) {
    double t = elapsed();
    json_t *j = json_pack(
        "{s:s, s:s, s:s, s:o, s:o, s:o, s:o, s:I, s:o, s:I, s:I, s:o, s:o, s:i, s:I, s:s, "
        "s:{s:I, s:I, s:I, s:I, s:I, s:I}}",
        "status", C.status ? C.status : "completed", "name", C.r.name, "run_id", C.s.run_id,
        "test_accuracy", kd_json_number(final->test.accuracy), "test_loss",
        kd_json_number(final->test.loss), "val_accuracy", kd_json_number(final->val.accuracy),
        "val_loss", kd_json_number(final->val.loss), "best_step", (json_int_t) final->best_step,
        "best_val_accuracy", kd_json_number(final->best_val_accuracy), "epochs",
        (json_int_t)(C.applied_count == C.n_batches ? C.s.epoch + 1 : C.s.epoch), "steps",
        (json_int_t)C.s.step, "samples_per_sec", kd_json_number(train_rate()), "wall_seconds",
        kd_json_number(t), "workers_max", C.workers_max, "parameters",
        (json_int_t)C.model->n_params, "consistency", kd_consistency_name(C.r.cluster.consistency),
        "ledger", "batches_expected", (json_int_t)C.s.batches_expected, "batches_applied",
        (json_int_t)C.s.batches_applied, "duplicates_dropped", (json_int_t)C.s.duplicates,
        "restreamed", (json_int_t)C.s.restreamed, "stale_dropped", (json_int_t)C.stale_dropped,
        "messages_dropped", (json_int_t)C.messages_dropped);
    if (!j) {
        kd_log(KD_LOG_ERROR, "COORD-SUMMARY-FAIL", "cannot encode the summary");
        return -1;
    }
    if (C.fail_reason[0]) json_object_set_new(j, "error", json_string(C.fail_reason));
    json_t *ledger = json_object_get(j, "ledger");
    json_object_set_new(ledger, "connections_refused", json_integer(C.connections_refused));
    json_object_set_new(ledger, "gradients_rejected", json_integer(C.gradients_rejected));
    json_object_set_new(ledger, "nacks", json_integer(C.nacks));
    json_object_set_new(ledger, "members_evicted", json_integer(C.evicted));
    json_object_set_new(ledger, "hellos_refused", json_integer(C.hellos_refused));
    json_object_set_new(ledger, "control_refused", json_integer(C.control_refused));
    json_t *lost = json_array();
    for (long i = 0; i < C.n_lost && i < COORD_MAX_LOST; i++)
        json_array_append_new(lost, json_pack("{s:s, s:s, s:s, s:o}", "role", C.lost[i].role, "id",
                                              C.lost[i].id, "event", C.lost[i].event, "time",
                                              kd_json_number(C.lost[i].time)));
    json_object_set_new(j, "members_lost", lost);
    json_object_set_new(j, "members_lost_total", json_integer(C.n_lost));
    json_object_set_new(j, "teacher", teacher_work_json());
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
    snprintf(path, sizeof path, "%s/summary.json", C.run_dir);
    int rc = kd_write_file_atomic(path, text, strlen(text), err, sizeof err);
    if (rc) kd_log(KD_LOG_ERROR, "COORD-SUMMARY-FAIL", "%s", err);
    free(text);
    return rc;
}

static int run_loop(void) {
    double last_housekeeping = 0;
    while (!kd_node_stop_requested || C.phase == RUN_RUNNING) {
        if (kd_node_stop_requested && C.phase == RUN_RUNNING) finish("stopped");
        if (C.phase == RUN_FINISHING && C.finish_deadline == 0) {
            stop_nodes();
            C.finish_deadline = kd_now() + 3.0 * C.r.cluster.heartbeat_ms / 1000.0 + 1.0;
        }
        if (C.phase == RUN_FINISHING &&
            (live_count(KDIST__ROLE__WORKER) + live_count(KDIST__ROLE__TEACHER) == 0 ||
             kd_now() > C.finish_deadline))
            break;
        zmq_pollitem_t items[3] = {{C.router, 0, ZMQ_POLLIN, 0},
                                   {evaluator_socket(C.eval), 0, ZMQ_POLLIN, 0},
                                   {C.control, 0, ZMQ_POLLIN, 0}};
        int rc = zmq_poll(items, 3, 50);
        if (rc < 0 && errno != EINTR) {
            kd_log(KD_LOG_ERROR, "COORD-POLL", "zmq_poll: %s", zmq_strerror(errno));
            return -1;
        }
        /* bounded batch per wake-up, so housekeeping runs under load too */
        for (int k = 0; k < 256 && (items[0].revents & ZMQ_POLLIN); k++) {
            kd_msg_t msg;
            char err[KD_ERR_LEN];
            int r = kd_wire_recv(C.router, true, ZMQ_DONTWAIT, &msg, err, sizeof err);
            if (r == KD_WIRE_NONE) break;
            if (r == KD_WIRE_CLOSED) return -1;
            if (r == KD_WIRE_BAD) {
                drop(&msg, err);
                member_t *m = find_member(msg.peer, msg.peer_len);
                if (m) m->last_seen = kd_now();
                continue;
            }
            on_message(&msg);
            kd_msg_close(&msg);
        }
        if (items[2].revents & ZMQ_POLLIN) serve_control_channel();
        eval_result_t res;
        while (evaluator_result(C.eval, &res) == 0) handle_eval_result(&res);
        if (kd_now() - last_housekeeping >= 0.05) {
            heartbeat_and_reap();
            restream_stalled();
            if (!C.assigned && C.assign_at > 0 && kd_now() >= C.assign_at) assign_epoch();
            kd_wire_refused(C.router_monitor, "the coordinator socket", &C.connections_refused);
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
static int setup_curve(const char *recipe, const char *key_opt, char *err, size_t errlen) {
    if (!C.r.cluster.security.curve) {
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
    if (kd_curve_load_pair(key, &C.curve_pair, why, sizeof why) != 0)
        return kd_err(err, errlen, "%s: %s", key_opt ? "--key" : KD_CURVE_ENV_KEY, why);
    const char *given = C.r.cluster.security.coordinator_key;
    if (given[0]) {
        char pub[KD_CURVE_Z85_LEN + 1];
        snprintf(why, sizeof why, "%s: cluster.security.coordinator_key", recipe);
        if (kd_curve_load_public(given, why, pub, err, errlen) != 0) return -1;
        if (strcmp(pub, C.curve_pair.public_z85) != 0)
            return kd_err(err, errlen,
                          "%s: cluster.security.coordinator_key is %s but %s holds the pair of "
                          "%s: give the coordinator the pair that key belongs to",
                          recipe, pub, key, C.curve_pair.public_z85);
    }
    snprintf(C.r.cluster.security.coordinator_key, sizeof C.r.cluster.security.coordinator_key,
             "%s", C.curve_pair.public_z85);
    if (kd_curve_roles_load(&C.r, recipe, &C.keys, err, errlen) != 0) return -1;
    C.curve = true;
    return 0;
}

static int setup(int argc, char **argv, bool *resume, char *err, size_t errlen) {
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
    if (kd_recipe_load(recipe, overrides, n_over, &C.r, err, errlen) != 0) return -1;
    if (setup_curve(recipe, key, err, errlen) != 0) return -1;
    char what[KD_PATH_MAX + 32];
    snprintf(what, sizeof what, "%s: cluster.bind", recipe);
    if (kd_curve_check_plaintext_bind(&C.r, C.r.cluster.bind, what, err, errlen) != 0) return -1;
    if (C.r.distill.loss.alpha > 0 && !C.r.cache.import[0] &&
        (C.r.teacher.n_layers == 0 || !C.r.teacher.checkpoint[0]))
        return kd_err(err, errlen,
                      "%s: distill.alpha is %g but there is no teacher: set teacher.layers and "
                      "teacher.checkpoint, or cache.import to distil from imported logits",
                      recipe, (double)C.r.distill.loss.alpha);
    snprintf(C.run_dir, sizeof C.run_dir, "%s", run_dir);
    snprintf(C.ckpt_dir, sizeof C.ckpt_dir, "%s/checkpoints", run_dir);
    char best_dir[KD_PATH_MAX + 64];
    snprintf(best_dir, sizeof best_dir, "%s/best", C.ckpt_dir);
    if (kd_mkdirs(best_dir, err, errlen) != 0) return -1;
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/recipe.yaml", run_dir);
    if (kd_recipe_write(&C.r, path, err, errlen) != 0) return -1;
    if (kd_splits_load(&C.r, &C.data, err, errlen) != 0) return -1;
    if (kd_model_from_recipe(&C.r, false, C.data.train, &C.model, err, errlen) != 0) return -1;
    C.opt = kd_optim_new(&C.r.optim.cfg, C.model->n_params);
    C.sched = C.r.schedule.cfg;
    C.sched.total_steps = kd_train_total_steps(&C.r, C.data.train->n);
    C.n_batches = kd_epoch_count(C.data.train->n, (size_t)C.r.train.batch_size);
    C.applied = kd_xcalloc(C.n_batches ? C.n_batches : 1, 1);
    C.in_step = kd_xcalloc(C.n_batches ? C.n_batches : 1, 1);
    C.nacked = kd_xcalloc(C.n_batches ? C.n_batches : 1, sizeof *C.nacked);
    C.owner = kd_xcalloc(C.n_batches ? C.n_batches : 1, sizeof *C.owner);
    C.step_grad = kd_alloc_floats(C.model->n_params);
    C.win_layer_fwd = kd_xcalloc((size_t)C.model->n_layers, sizeof(double));
    C.win_layer_bwd = kd_xcalloc((size_t)C.model->n_layers, sizeof(double));
    C.s.best_step = -1;
    snprintf(C.s.run_id, sizeof C.s.run_id, "%s-%llx", C.r.name,
             (unsigned long long)kd_wire_new_incarnation());
    return 0;
}

static int resume_from_checkpoint(char *err, size_t errlen) {
    uint8_t *applied = NULL;
    size_t n = 0;
    char found[KD_PATH_MAX + 300];
    coord_state_t s = C.s;
    int rc =
        coord_checkpoint_resume(C.ckpt_dir, &s, C.model, C.opt, &applied, &n, found, sizeof found);
    if (rc == 1) {
        int files = coord_checkpoint_count(C.ckpt_dir);
        if (files > 0) /* starting afresh would throw the run away: say so instead */
            return kd_err(err, errlen,
                          "--resume: none of the %d checkpoint(s) in %s is valid (see the "
                          "COORD-CKPT-SKIP lines): move them away to start the run afresh",
                          files, C.ckpt_dir);
        kd_log(KD_LOG_INFO, "COORD-RESUME", "no checkpoint in %s yet: starting afresh", C.ckpt_dir);
        return 1;
    }
    if (n != C.n_batches) {
        free(applied);
        return kd_err(err, errlen, "%s: its ledger has %zu batches, this recipe gives %zu", found,
                      n, C.n_batches);
    }
    C.s = s;
    memcpy(C.applied, applied, n);
    free(applied);
    C.applied_count = 0;
    for (size_t b = 0; b < n; b++) C.applied_count += C.applied[b] != 0;
    kd_log(KD_LOG_INFO, "COORD-RESUME", "resumed from %s: epoch %u, step %ld, %zu/%zu batches",
           found, C.s.epoch, C.s.step, C.applied_count, C.n_batches);
    return 0;
}

int main(int argc, char **argv) {
    char err[KD_ERR_LEN];
    bool resume = false;
    int exit_code = 1;
    kd_node_signals_install();
    kd_log_init("coordinator", "0", KD_LOG_INFO, NULL);
    if (setup(argc, argv, &resume, err, sizeof err) != 0) {
        fprintf(stderr, "kdist-coordinator: %s\n", err);
        return 2;
    }
    kd_log_level_t level;
    if (kd_log_level_parse(C.r.logging.level, &level) == 0) kd_log_threshold = level;
    kd_set_threads((int)C.r.train.threads);
    if (!resume && coord_checkpoint_count(C.ckpt_dir) > 0) {
        fprintf(stderr,
                "kdist-coordinator: %s holds checkpoints of an earlier run: resume it with "
                "--resume, or give another --run-dir\n",
                C.ckpt_dir);
        return 2;
    }
    int resumed = resume ? resume_from_checkpoint(err, sizeof err) : 1;
    if (resumed < 0) {
        kd_log(KD_LOG_ERROR, "COORD-RESUME-FAIL", "%s", err);
        return 2;
    }

    C.ctx = zmq_ctx_new();
    if (C.curve) { /* the gatekeeper first: without it libzmq would let any key in */
        if (!(C.zap = kd_zap_new(C.ctx, C.keys.all, "COORD-CURVE-REFUSED", err, sizeof err))) {
            kd_log(KD_LOG_ERROR, "COORD-CURVE", "%s", err);
            goto out;
        }
        kd_log(KD_LOG_INFO, "COORD-CURVE",
               "CurveZMQ on: public key %s, %d authorized key(s); every other key is refused",
               C.curve_pair.public_z85, C.keys.all->n);
    }
    C.router = kd_socket_router_curve(C.ctx, C.r.cluster.bind, (int)C.r.cluster.heartbeat_ms,
                                      C.curve ? &C.curve_pair : NULL, C.endpoint, sizeof C.endpoint,
                                      err, sizeof err);
    if (!C.router) {
        kd_log(KD_LOG_ERROR, "COORD-BIND", "%s", err);
        goto out;
    }
    if (setup_control_channel(err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "COORD-CONTROL", "%s", err);
        goto out;
    }
    if (!(C.router_monitor = kd_wire_monitor(C.ctx, C.router, "coordinator", err, sizeof err)))
        kd_log(KD_LOG_WARN, "COORD-MONITOR", "%s: refused connections go uncounted", err);
    if (!(C.metrics = kd_metrics_open(C.run_dir, err, sizeof err))) {
        kd_log(KD_LOG_ERROR, "COORD-METRICS", "%s", err);
        goto out;
    }
    if (kd_metrics_graph(C.metrics, C.model, err, sizeof err) != 0)
        kd_log(KD_LOG_WARN, "COORD-METRICS", "%s", err);
    char best[KD_PATH_MAX + 96];
    snprintf(best, sizeof best, "%s/best/student.safetensors", C.ckpt_dir);
    /* What to beat: the checkpoint's best, or the best file's if that came later */
    evaluator_best_t to_beat = {.step = C.s.best_step,
                                .val_accuracy = C.s.best_val_accuracy,
                                .evals_since = (int)C.s.evals_since_best},
                     on_disk;
    if (resumed == 0 && evaluator_read_best(best, &on_disk) == 0 &&
        (to_beat.step < 0 || on_disk.val_accuracy > to_beat.val_accuracy)) {
        kd_log(KD_LOG_INFO, "COORD-RESUME-BEST",
               "%s holds the best so far (step %ld, val accuracy %.4f), newer than the "
               "checkpoint's",
               best, on_disk.step, on_disk.val_accuracy);
        to_beat = (evaluator_best_t){.step = on_disk.step, .val_accuracy = on_disk.val_accuracy};
        C.s.best_step = on_disk.step;
        C.s.best_val_accuracy = on_disk.val_accuracy;
    }
    C.eval = evaluator_new(C.ctx, &C.r, C.model, &C.data, best, &to_beat);
    C.t0 = C.win_t0 = kd_now();
    setup_shared_memory();
    if (resumed == 0) add_event("restart", "coordinator", "0"); /* from its checkpoint */

    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/coordinator.endpoint", C.run_dir);
    if (kd_write_file_atomic(path, C.endpoint, strlen(C.endpoint), err, sizeof err) != 0) {
        kd_log(KD_LOG_ERROR, "COORD-ENDPOINT", "%s", err);
        goto out;
    }
    kd_log(KD_LOG_INFO, "COORD-START",
           "run %s: %zu parameters, %zu training samples in %zu batches, %s, listening on %s",
           C.s.run_id, C.model->n_params, C.data.train->n, C.n_batches,
           kd_consistency_name(C.r.cluster.consistency), C.endpoint);
    if (resumed != 0)
        start_epoch(0);
    else if (C.applied_count < C.n_batches)
        assign_epoch(); /* the checkpoint's epoch goes on */
    else if (C.s.epoch + 1 < (uint32_t)C.r.train.epochs)
        start_epoch(C.s.epoch + 1);
    else
        finish("completed"); /* the checkpoint is the end of the run */

    if (run_loop() != 0) goto out;
    if (!C.status) C.status = "completed";
    eval_result_t final = {0};
    if (C.last_eval_step != C.s.step) request_eval();
    if (evaluator_drain(C.eval, &final) == 0 && final.step == C.s.step)
        handle_eval_result(&final);
    else if (C.have_eval && C.last_eval.step == C.s.step)
        final = C.last_eval; /* it came in while the nodes said goodbye */
    snprintf(path, sizeof path, "%s/student.safetensors", C.run_dir);
    bool saved = kd_checkpoint_save(C.model, path, err, sizeof err) == 0;
    if (!saved) {
        kd_log(KD_LOG_ERROR, "COORD-SAVE", "%s", err);
        fail_run("the final weights were not saved: %s", err);
    }
    save_checkpoint();
    write_metrics();
    /* 0 only for a run that ended as planned with its outputs written */
    exit_code = write_summary(&final) == 0 && saved && strcmp(C.status, "failed") != 0 ? 0 : 1;
    kd_log(KD_LOG_INFO, "COORD-DONE",
           "%s after %ld steps: test accuracy %.4f, %ld/%ld batches applied, %ld duplicates",
           C.status, C.s.step, final.test.accuracy, C.s.batches_applied, C.s.batches_expected,
           C.s.duplicates);
out:
    evaluator_destroy(&C.eval);
    kd_metrics_close(&C.metrics);
    invalidate_weights();
    for (int k = 0; k < C.step_count; k++) kd_msg_close(&C.step_msgs[k]);
    if (C.router_monitor) zmq_close(C.router_monitor);
    if (C.router) zmq_close(C.router);
    close_control_channel();
    kd_zap_destroy(&C.zap);
    kd_curve_roles_free(&C.keys);
    if (C.ctx) zmq_ctx_term(C.ctx);
    kd_optim_destroy(&C.opt);
    kd_model_destroy(&C.model);
    kd_splits_destroy(&C.data);
    free(C.applied);
    free(C.in_step);
    free(C.nacked);
    free(C.owner);
    free(C.step_grad);
    free(C.win_layer_fwd);
    free(C.win_layer_bwd);
    return exit_code;
}
