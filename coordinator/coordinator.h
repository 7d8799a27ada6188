/* coordinator: the parameter server and control plane (DESIGN §2-3, docs/protocol.md).
 * One thread owns all of this state and serves the ROUTER socket; evaluation runs on an
 * actor thread (evaluator.c). Files here are private to the kdist-coordinator binary. */
#ifndef KD_COORDINATOR_H
#define KD_COORDINATOR_H

#include <stdbool.h>
#include <stdint.h>
#include <zmq.h>

#include "kd_metrics.h"
#include "kd_model.h"
#include "kd_optim.h"
#include "kd_recipe.h"
#include "kd_shm.h"
#include "kd_train.h"
#include "kd_wire.h"

#define COORD_MAX_MEMBERS 1100
#define COORD_MAX_EVENTS  64

typedef enum { WORKER_COMPUTING = 0, WORKER_PUSHED, WORKER_HELD, WORKER_IDLE } worker_state_t;

typedef struct {
    bool used;
    Kdist__Role role;
    char node_id[64];
    uint64_t incarnation;
    uint8_t rid[KD_WIRE_MAX_PEER]; /* routing id */
    size_t rid_len;
    char host[64];
    uint32_t pid, threads;
    char stream_endpoint[256];
    char curve_key[KD_CURVE_Z85_LEN + 1]; /* CurveZMQ: its authenticated public key */
    double joined, last_seen, last_sent;
    uint64_t rss_bytes;
    uint64_t messages_dropped, connections_refused; /* as the node last reported them */
    uint64_t forward_samples, cache_hits, cache_misses, cache_corrupt; /* a teacher's, likewise */
    bool said_goodbye;
    /* workers */
    worker_state_t state;
    bool waiting_for_batch;           /* last report: no batch in hand */
    bool drain;                       /* stop it after its next push */
    uint64_t clock;                   /* pushes applied or collected (SSP) */
    long rejected_in_a_row;           /* its pushes rejected since its last accepted one */
    long accepted_at_first_rejection; /* the cluster's accepted pushes when that streak began */
    long steps;
    long samples;
    double rate_t0;
    long rate_samples;
    double samples_per_sec;
    /* the same-host fast path: its gradient segment, and the weights slot it was last pointed
     * to (slot + 1, 0 = none) until it reports holding that version */
    kd_shm_t grad_shm;
    bool shm_active; /* its last push came through shared memory */
    uint32_t held_slot;
    /* cluster.overlap: the push whose gradient is coming in chunks (stream.c) */
    kd_msg_t chunk_push;       /* its header, kept until the last chunk */
    bool chunking;             /* chunks of chunk_clock are due */
    uint64_t chunk_clock;      /* that push's clock */
    uint64_t chunk_skip_clock; /* a push answered before its last chunk: the rest are ignored */
    size_t chunk_next;         /* the offset the next chunk starts at */
    float *chunk_grad;         /* (n_params) the gradient so far, in fp32 */
    double chunk_last;         /* when a chunk last came */
    /* teachers */
    uint64_t batches_streamed;
} member_t;

typedef struct {
    double time;
    char event[16];
    char role[16];
    char id[64];
} coord_event_t;

/* Room for eval.sample_tokens of text (GPT-2 tokens average about 4 bytes); a longer sample is
 * cut at a character boundary. */
#define EVAL_SAMPLE_BYTES 8192

/* One evaluation's results (val and test), from the evaluator thread. */
typedef struct {
    long step;
    kd_eval_t val, test;
    bool improved; /* the best validation score so far */
    long best_step;
    double best_score; /* val accuracy, or minus val loss for a language model */
    int evals_since_best;
    char sample[EVAL_SAMPLE_BYTES]; /* a language model's text sample (UTF-8), or "" */
} eval_result_t;

typedef struct evaluator evaluator_t;

/* What the next evaluation has to beat: the best so far and the evaluations since. */
typedef struct {
    long step;    /* -1: none yet */
    double score; /* as eval_result_t.best_score */
    int evals_since;
} evaluator_best_t;

/* Starts the evaluator actor on its own copy of the model; it saves the best weights to
 * best_path when validation accuracy improves on *best (NULL: nothing to beat yet). */
evaluator_t *evaluator_new(void *ctx, const kd_recipe_t *r, const kd_model_t *model,
                           const kd_splits_t *data, const char *best_path,
                           const evaluator_best_t *best);
/* The step and score stored in a best-weights file the evaluator wrote; -1 if there is none
 * or it does not say. */
int evaluator_read_best(const char *best_path, evaluator_best_t *out);
/* Asks for an evaluation of params (copied now) at step. Non-blocking; it replaces a request
 * that still waits, so at most one snapshot is ever queued. */
void evaluator_request(evaluator_t *ev, const float *params, long step);
/* Requests replaced by a newer one before they were evaluated. */
long evaluator_superseded(evaluator_t *ev);
/* The socket to poll for results (ZMQ_POLLIN), and reading one result. */
void *evaluator_socket(evaluator_t *ev);
int evaluator_result(evaluator_t *ev, eval_result_t *out);
/* Blocks for the next result still to come; -1 when every requested evaluation has reported.
 * At the end of a run: every result is handled, none is lost between the last two. */
int evaluator_next(evaluator_t *ev, eval_result_t *out);
void evaluator_destroy(evaluator_t **self_p);

#endif
