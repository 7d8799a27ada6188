/* coord: the coordinator's state and the functions its files share (the .c files here). One
 * thread owns a coord_t; every function takes it. Private to kdist-coordinator and its tests. */
#ifndef KD_COORD_H
#define KD_COORD_H

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

#include "kd_checkpoint.h"
#include "kd_curve.h"
#include "kd_log.h"
#include "kd_node.h"
#include "checkpoint.h"
#include "coordinator.h"

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
    bool started;     /* batches handed out since this process started (cluster.start_workers) */
    bool held;        /* the first Assign is due but waits for cluster.start_workers workers */
    double last_progress;

    /* the open sync step: gradients held until it closes */
    kd_msg_t step_msgs[COORD_MAX_MEMBERS];
    int step_member[COORD_MAX_MEMBERS];
    int step_count;
    size_t step_batches; /* the batches its pushes name (more than step_count: accumulate) */
    float *step_grads[COORD_MAX_MEMBERS];  /* each push's gradient: its frame or shared memory */
    float *step_copies[COORD_MAX_MEMBERS]; /* owned: unpacked ones, copies of those who left */
    float *step_grad;                      /* (n_params) weighted average */
    float *wire_grad; /* (n_params) a 16-bit push unpacked, or a closed step's buffer to reuse */

    /* cluster.overlap: the worker whose push is being applied chunk by chunk (NULL: none), the
     * learning rate and clip of that update, what its chunks overwrote (params, optimizer moments
     * [0, applying->chunk_next)), and a 16-bit WeightsChunk's values */
    member_t *applying;
    float applying_lr;
    double applying_scale; /* optim.clip_norm's, from the norm the push declared; 1 = none */
    float *clipped;        /* (n_params) chunks times applying_scale */
    float *undo_params, *undo_m, *undo_v;
    void *chunk_out;
    long pushes_streamed, streams_undone; /* applied chunk by chunk; undone half way */

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
    long win_predictions; /* what win_loss and win_correct count: samples, or an LM's tokens */
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

/* The answer to a worker's push (or to a waiting worker): the Weights message's flags. */
typedef enum {
    REPLY_WEIGHTS = 0, /* the current weights: go on */
    REPLY_WAIT,        /* SSP: too far ahead, hold until the next Weights */
    REPLY_STOP,        /* the run is over for it: say goodbye */
    REPLY_REDO,        /* sync: too late for its step, the same batch again on these weights */
    REPLY_DROPPED,     /* the gradient was not applied (already counted, stale or rejected) */
    REPLY_STREAMED,    /* applied: the WeightsChunk messages sent are the new version */
} reply_t;

/* ---- members.c: who is in the run (Hello, heartbeats, leaving, eviction); sending to them */

const char *coord_role_name(Kdist__Role role);
void coord_add_teacher_counters(member_t *sum, const member_t *m);
void coord_add_event(coord_t *c, const char *event, const char *role, const char *id);
void coord_drop(coord_t *c, const kd_msg_t *msg, const char *why);
member_t *coord_find_member(coord_t *c, const uint8_t *rid, size_t len);
int coord_live_count(coord_t *c, Kdist__Role role);
int coord_send_to(coord_t *c, member_t *m, kd_env_t *env, const kd_wire_tensor_t *t, int n);
void coord_send_refused(coord_t *c, const uint8_t *rid, size_t len, Kdist__RefusalCode code,
                        const char *reason);
void coord_remove_member(coord_t *c, member_t *m, const char *event);
void coord_evict_member(coord_t *c, member_t *m, const char *why);
void coord_on_hello(coord_t *c, kd_msg_t *msg);
void coord_on_heartbeat(coord_t *c, member_t *m, const Kdist__Heartbeat *hb);
void coord_heartbeat_and_reap(coord_t *c);
void coord_stop_nodes(coord_t *c);

/* ---- ledger.c: which batches are applied, assigned, streamed again or refused (Nacks) */

/* The epoch's ledger and the open step's buffers, sized by c->n_batches and c->model. */
void coord_alloc_ledger(coord_t *c);
void coord_free_ledger(coord_t *c);
void coord_assign_epoch(coord_t *c);
void coord_start_epoch(coord_t *c, uint32_t epoch);
void coord_reassign_share(coord_t *c, const member_t *gone);
void coord_restream_unapplied(coord_t *c, const char *why);
void coord_restream_stalled(coord_t *c);
void coord_mark_applied(coord_t *c, const Kdist__BatchRef *ref);
void coord_requeue_batch(coord_t *c, const Kdist__BatchRef *ref);
/* A push's batches: its ref, then the ones accumulated into it (cluster.accumulate). */
size_t coord_push_batches(const Kdist__PushGradient *p);
const Kdist__BatchRef *coord_push_ref(const Kdist__PushGradient *p, size_t i);
void coord_requeue_push(coord_t *c, const Kdist__PushGradient *p);
/* Batches of the epoch neither applied nor in the open step (what the workers still get). */
uint64_t coord_batches_left(const coord_t *c);
void coord_on_nack(coord_t *c, member_t *m, kd_msg_t *msg);

/* ---- step.c: gradients: validation, the sync step, the SSP gate, async updates */

void coord_finish(coord_t *c, const char *status);
void coord_fail_run(coord_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
double coord_train_rate(coord_t *c);
void coord_keep_step_gradients(coord_t *c, member_t *m);
bool coord_sync_step_ready(coord_t *c);
void coord_close_sync_step(coord_t *c);
uint64_t coord_min_clock(coord_t *c);
void coord_release_held_workers(coord_t *c);
void coord_on_push(coord_t *c, member_t *m, kd_msg_t *msg);
/* A push with its gradient in fp32 (owned by msg, the worker's segment or c->wire_grad): checked,
 * then applied or collected into the sync step, and answered. */
void coord_take_push(coord_t *c, member_t *m, kd_msg_t *msg, float *grad);
bool coord_gradient_problem(coord_t *c, const float *grad, const Kdist__PushGradient *p, char *why,
                            size_t whylen);
void coord_reject_push(coord_t *c, member_t *m, const Kdist__PushGradient *p, const char *why);
bool coord_push_streams(coord_t *c, const member_t *m, const Kdist__PushGradient *p);
void coord_commit_streamed_push(coord_t *c, member_t *m, const Kdist__PushGradient *p);

/* ---- stream.c: pushes whose gradient comes in chunks (cluster.overlap) */

void coord_on_chunked_push(coord_t *c, member_t *m, kd_msg_t *msg);
void coord_on_gradient_chunk(coord_t *c, member_t *m, kd_msg_t *msg);
/* Whether a push other than m's is half applied (m's pushes wait for it: REDO). */
bool coord_other_push_applying(const coord_t *c, const member_t *m);
/* The weights are about to be read whole: a push half applied is undone, its worker redoes it. */
void coord_settle_weights(coord_t *c);
/* m leaves, or its chunks stopped coming for cluster.heartbeat_timeout_ms: its push ends. */
void coord_end_chunked_push(coord_t *c, member_t *m);
void coord_check_chunk_stalls(coord_t *c);
/* The current version's weights packed in dtype into dst: while a push is half applied, its
 * applied ranges come from what they overwrote. */
void coord_pack_current_weights(coord_t *c, kd_dtype_t dtype, void *dst);

/* ---- weights.c: the current weights for replies, and the shared-memory slots */

void coord_invalidate_weights(coord_t *c);
kd_wire_tensor_t coord_weights_tensor(coord_t *c);
void coord_setup_shared_memory(coord_t *c);
bool coord_offer_shared_memory(coord_t *c, member_t *m, Kdist__SharedMemory *offer);
void coord_release_slot(coord_t *c, member_t *m);
void coord_note_weights_held(coord_t *c, member_t *m, uint64_t version);
reply_t coord_go_on(coord_t *c);
void coord_send_weights(coord_t *c, member_t *m, reply_t reply);

/* ---- status.c: evaluation results, metrics, checkpoints, StatusReply, summary.json */

double coord_elapsed(coord_t *c);
void coord_request_eval(coord_t *c);
void coord_handle_eval_result(coord_t *c, const eval_result_t *res);
void coord_save_checkpoint(coord_t *c);
void coord_write_metrics(coord_t *c);
json_t *coord_status_json(coord_t *c);
int coord_write_summary(coord_t *c, const eval_result_t *final);

#endif
