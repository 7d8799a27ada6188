/* test_coord_step: the coordinator's ledger, sync step closing and SSP gate, without processes.
 * A coord_t is set up as kdist-coordinator's set-up would (recipe defaults, a small MLP, SGD),
 * its ROUTER bound on inproc://, and each member is a DEALER of this test: pushes are real
 * PushGradient messages taken off the ROUTER and given to coord_on_push, and the replies are
 * read back as the workers would (Weights with its flags, Refused).
 *   - sync: a step closes when every live worker pushed (or waits for a batch), with the
 *     samples-weighted mean of the gradients; a worker that leaves does not hold it; a push on
 *     old weights is told to redo; a second push in one step is dropped;
 *   - the ledger: every batch applied once per epoch (a repeat is a counted duplicate), the
 *     next epoch starts when the last batch is applied, the run finishes after the last epoch;
 *     a rejected (non-finite) gradient is not applied and its batch goes back to its teacher;
 *   - cluster.wire bf16: 16-bit gradients summed in fp32, an fp32 payload dropped, NaN rejected,
 *     bf16 weights sent from the fp32 master;
 *   - SSP: a worker more than `staleness` clocks ahead of the slowest waits, and is released
 *     when the slowest catches up; a worker without a batch does not hold others back. */
#include <math.h>

#include "coord.h"
#include "kd_half.h"
#include "kd_test.h"

#define N_BATCHES 4
#define BATCH     2
#define LR        0.5f

static const kd_layer_spec_t MLP[] = {
    {.kind = KD_LAYER_FLATTEN},
    {.kind = KD_LAYER_LINEAR, .out_features = 3},
};

enum { W0, W1, W2, TEACHER, N_PEERS };

typedef struct {
    coord_t *c;
    void *peer[N_PEERS]; /* DEALERs: three workers and a teacher node */
    member_t *member[N_PEERS];
} rig_t;

static int endpoint_seq = 0;

static void rig_start(rig_t *t, kd_consistency_t consistency, long staleness, long epochs) {
    memset(t, 0, sizeof *t);
    coord_t *c = t->c = kd_xcalloc(1, sizeof *c);
    kd_recipe_defaults(&c->r);
    c->r.cluster.consistency = consistency;
    c->r.cluster.staleness = staleness;
    c->r.train.epochs = epochs;
    c->r.train.batch_size = BATCH;
    c->r.logging.every_steps = 1000000; /* no metrics file */
    c->r.eval.every_steps = 1000000;    /* no evaluator */
    c->r.checkpoint.every_steps = 0;
    c->r.cluster.shared_memory = false;
    char err[KD_ERR_LEN];
    CHECK(kd_model_new(MLP, 2, (kd_shape_t){1, 2, 2}, &c->model, err, sizeof err) == 0);
    for (size_t i = 0; i < c->model->n_params; i++) c->model->params[i] = 1.0f;
    kd_optim_config_t cfg = {.kind = KD_OPT_SGD};
    c->opt = kd_optim_new(&cfg, c->model->n_params);
    c->sched = (kd_schedule_config_t){.kind = KD_SCHED_CONSTANT, .lr = LR};
    c->n_batches = N_BATCHES;
    coord_alloc_ledger(c);
    c->s.best_step = -1;
    c->s.batches_expected = N_BATCHES;
    c->phase = RUN_RUNNING;
    c->assigned = true;
    c->ctx = zmq_ctx_new();
    char endpoint[64];
    snprintf(endpoint, sizeof endpoint, "inproc://coord-step-%d", endpoint_seq++);
    c->router = kd_socket_router_local(c->ctx, endpoint, err, sizeof err);
    CHECK(c->router != NULL);
    static const char *const ids[N_PEERS] = {"w0", "w1", "w2", "t0"};
    for (int p = 0; p < N_PEERS; p++) {
        t->peer[p] = kd_socket_dealer(c->ctx, ids[p], endpoint, 0, err, sizeof err);
        CHECK(t->peer[p] != NULL);
        member_t *m = t->member[p] = &c->members[p];
        m->used = true;
        m->role = p == TEACHER ? KDIST__ROLE__TEACHER : KDIST__ROLE__WORKER;
        snprintf(m->node_id, sizeof m->node_id, "%s", ids[p]);
        memcpy(m->rid, ids[p], 2);
        m->rid_len = 2;
        m->state = WORKER_COMPUTING;
        m->last_seen = kd_now();
    }
    /* the teacher owns every batch, as the epoch's assignment would have said */
    for (size_t b = 0; b < N_BATCHES; b++) c->owner[b] = TEACHER;
    /* the DEALERs' pipes exist once the ROUTER has seen them: one message each */
    for (int p = 0; p < N_PEERS; p++) {
        CHECK(zmq_send(t->peer[p], "hi", 2, 0) == 2);
        char buf[16];
        CHECK(zmq_recv(c->router, buf, sizeof buf, 0) == 2); /* the routing id */
        CHECK(zmq_recv(c->router, buf, sizeof buf, 0) == 2);
    }
}

static void rig_stop(rig_t *t) {
    coord_t *c = t->c;
    for (int k = 0; k < c->step_count; k++) {
        kd_msg_close(&c->step_msgs[k]);
        free(c->step_copies[k]);
    }
    coord_invalidate_weights(c);
    for (int p = 0; p < N_PEERS; p++) zmq_close(t->peer[p]);
    zmq_close(c->router);
    zmq_ctx_term(c->ctx);
    coord_free_ledger(c);
    kd_optim_destroy(&c->opt);
    kd_model_destroy(&c->model);
    free(c);
}

/* Worker p pushes a gradient of `value` everywhere for batches b[0..n_b) of the current epoch
 * (more than one: accumulated, BATCH samples each), computed on weights `version`; the
 * coordinator takes it off its ROUTER and handles it. */
static void push_batches(rig_t *t, int p, const uint32_t *b, size_t n_b, float value,
                         uint64_t version, kd_dtype_t dtype) {
    coord_t *c = t->c;
    size_t n = c->model->n_params;
    float *values = kd_xmalloc(n * sizeof *values);
    for (size_t i = 0; i < n; i++) values[i] = value;
    void *g = kd_xmalloc(n * sizeof(float));
    kd_wire_pack_floats(dtype, values, n, g);
    free(values);
    Kdist__BatchRef refs[8], *more[8];
    KD_ASSERT(n_b >= 1 && n_b <= 8);
    for (size_t i = 0; i < n_b; i++) {
        kdist__batch_ref__init(&refs[i]);
        refs[i].epoch = c->s.epoch;
        refs[i].batch_id = b[i];
        more[i] = &refs[i];
    }
    Kdist__PushGradient pg = KDIST__PUSH_GRADIENT__INIT;
    pg.ref = &refs[0];
    pg.accumulated = more + 1;
    pg.n_accumulated = n_b - 1;
    pg.samples = (uint32_t)(BATCH * n_b);
    pg.base_version = version;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_PUSH;
    env.push = &pg;
    const kd_layout_t layout = kd_layout_as(&KD_LAYOUT_GRADIENT, dtype);
    kd_wire_tensor_t tensor = kd_layout_tensor(&layout, (int64_t[]){(int64_t)n});
    tensor.data = g;
    tensor.nbytes = n * kd_dtype_size(dtype);
    CHECK(kd_wire_send(t->peer[p], NULL, 0, &env, &tensor, 1, 0) == 0);
    free(g);
    kd_msg_t msg;
    char err[KD_ERR_LEN];
    CHECK(kd_wire_recv(c->router, true, 0, &msg, err, sizeof err) == KD_WIRE_OK);
    member_t *m = coord_find_member(c, msg.peer, msg.peer_len);
    CHECK(m == t->member[p]);
    if (m) coord_on_push(c, m, &msg);
    kd_msg_close(&msg); /* (empty when the open step kept it) */
}

static void push_as(rig_t *t, int p, uint32_t b, float value, uint64_t version, kd_dtype_t dtype) {
    push_batches(t, p, &b, 1, value, version, dtype);
}

static void push(rig_t *t, int p, uint32_t b, float value, uint64_t version) {
    push_as(t, p, b, value, version, KD_DTYPE_F32);
}

typedef enum { NONE, WEIGHTS, WAIT, STOP, REDO, DUPLICATE, ASSIGN, STREAMED } reply_kind_t;

static uint64_t last_batches_left; /* of the last Weights reply() read */
/* cluster.overlap: the WeightsChunk messages reply() read, their values at their offsets */
static float chunk_weights[64];
static int chunks_seen;
static uint64_t chunk_version;

/* What peer p was sent last since the previous call (NONE: nothing); the weights version of a
 * Weights reply in *version, the batch ids of an Assign in ids. */
static reply_kind_t reply(rig_t *t, int p, uint64_t *version, uint32_t *ids, size_t *n_ids) {
    reply_kind_t kind = NONE;
    kd_msg_t msg;
    char err[KD_ERR_LEN];
    while (kd_wire_recv(t->peer[p], false, ZMQ_DONTWAIT, &msg, err, sizeof err) == KD_WIRE_OK) {
        if (msg.env->body_case == KDIST__ENVELOPE__BODY_WEIGHTS) {
            const Kdist__Weights *w = msg.env->weights;
            kind = w->stop        ? STOP
                   : w->wait      ? WAIT
                   : w->redo      ? REDO
                   : w->duplicate ? DUPLICATE
                   : w->streamed  ? STREAMED
                                  : WEIGHTS;
            if (version) *version = w->version;
            last_batches_left = w->batches_left;
        } else if (msg.env->body_case == KDIST__ENVELOPE__BODY_WEIGHTS_CHUNK) {
            const size_t offset = msg.env->weights_chunk->offset;
            const size_t len = (size_t)msg.env->tensors[0]->shape[0];
            CHECK(offset + len <= 64);
            if (offset + len <= 64)
                memcpy(chunk_weights + offset, kd_msg_data(&msg, 0), len * sizeof(float));
            chunks_seen++;
            chunk_version = msg.env->weights_chunk->version;
        } else if (msg.env->body_case == KDIST__ENVELOPE__BODY_ASSIGN) {
            kind = ASSIGN;
            for (size_t i = 0; ids && i < msg.env->assign->n_batch_ids && i < N_BATCHES; i++)
                ids[i] = msg.env->assign->batch_ids[i];
            if (n_ids) *n_ids = msg.env->assign->n_batch_ids;
        }
        kd_msg_close(&msg);
    }
    return kind;
}

static reply_kind_t reply_of(rig_t *t, int p) {
    return reply(t, p, NULL, NULL, NULL);
}

/* ---- sync ----------------------------------------------------------------------------------- */

static void test_sync_step(void) {
    rig_t t;
    rig_start(&t, KD_CONSISTENCY_SYNC, 0, 2);
    coord_t *c = t.c;
    /* two of three pushed: the step waits for the third */
    push(&t, W0, 0, 1.0f, 0);
    push(&t, W1, 1, 2.0f, 0);
    CHECK(c->s.version == 0 && c->step_count == 2);
    CHECK(!coord_sync_step_ready(c));
    CHECK(reply_of(&t, W0) == NONE && reply_of(&t, W1) == NONE);
    /* a second push in the same step is dropped, the step unchanged */
    push(&t, W1, 2, 5.0f, 0);
    CHECK(c->step_count == 2 && c->messages_dropped == 1);
    /* the third closes it: one update from the mean gradient (1+2+3)/3 = 2 */
    push(&t, W2, 2, 3.0f, 0);
    CHECK(c->s.version == 1 && c->s.step == 1 && c->step_count == 0);
    CHECK(fabsf(c->model->params[0] - (1.0f - LR * 2.0f)) < 1e-6f);
    uint64_t v = 0;
    for (int p = W0; p <= W2; p++) {
        CHECK(reply(&t, p, &v, NULL, NULL) == WEIGHTS);
        CHECK(v == 1);
    }
    CHECK(c->applied[0] && c->applied[1] && c->applied[2] && !c->applied[3]);
    CHECK(c->applied_count == 3 && c->s.batches_applied == 3);

    /* a push computed on old weights: told to redo the same batch on the new ones */
    push(&t, W1, 3, 1.0f, 0);
    CHECK(reply_of(&t, W1) == REDO && c->step_count == 0);
    /* a worker still waiting for a batch does not hold the step; one computing does */
    t.member[W2]->waiting_for_batch = true;
    push(&t, W0, 3, 1.0f, 1);
    CHECK(c->s.version == 1 && !coord_sync_step_ready(c)); /* w1 computes */
    t.member[W1]->waiting_for_batch = true;
    CHECK(coord_sync_step_ready(c));
    /* the epoch's last batch applied: epoch 1 starts, its batches all to do again */
    coord_close_sync_step(c);
    CHECK(c->s.epoch == 1 && c->applied_count == 0 && c->s.batches_applied == 4);
    CHECK(c->s.batches_expected == 2 * N_BATCHES);
    uint32_t ids[N_BATCHES];
    size_t n_ids = 0;
    CHECK(reply(&t, TEACHER, NULL, ids, &n_ids) == ASSIGN && n_ids == N_BATCHES);
    CHECK(reply_of(&t, W0) == WEIGHTS);

    /* a worker that leaves while the others pushed closes the step without it */
    t.member[W1]->waiting_for_batch = t.member[W2]->waiting_for_batch = false;
    push(&t, W0, 0, 1.0f, 2);
    push(&t, W1, 1, 1.0f, 2);
    CHECK(c->s.version == 2);
    coord_remove_member(c, t.member[W2], "dead");
    CHECK(c->s.version == 3 && c->applied[0] && c->applied[1]);
    CHECK(reply_of(&t, W0) == WEIGHTS && reply_of(&t, W1) == WEIGHTS);
    /* the last two batches: the run completes, and the workers are told to stop */
    push(&t, W0, 2, 1.0f, 3);
    push(&t, W1, 3, 1.0f, 3);
    CHECK(c->phase == RUN_FINISHING && c->status && strcmp(c->status, "completed") == 0);
    CHECK(c->s.batches_applied == 2 * N_BATCHES && c->s.duplicates == 0);
    if (c->s.batches_applied != 2 * N_BATCHES)
        fprintf(stderr, "applied %ld, duplicates %ld\n", c->s.batches_applied, c->s.duplicates);
    CHECK(reply_of(&t, W0) == STOP && reply_of(&t, W1) == STOP);
    rig_stop(&t);
}

/* cluster.wire bf16: gradients come as bf16 and are summed in fp32 (each push its own buffer
 * while the step is open), an fp32 payload is dropped, a NaN stays NaN and is rejected, and the
 * weights go back as bf16 of the fp32 master. */
static void test_wire_bf16(void) {
    rig_t t;
    rig_start(&t, KD_CONSISTENCY_SYNC, 0, 2);
    coord_t *c = t.c;
    c->r.cluster.wire = KD_WIRE_BF16;
    push_as(&t, W0, 0, 1.0f, 0, KD_DTYPE_BF16);
    CHECK(c->step_count == 1 && c->step_copies[0] && c->step_grads[0] == c->step_copies[0]);
    push_as(&t, W1, 1, 2.0f, 0, KD_DTYPE_F32); /* not the run's wire: dropped, answered */
    CHECK(c->step_count == 1 && c->messages_dropped == 1);
    CHECK(reply_of(&t, W1) == DUPLICATE); /* answered: a worker is never left waiting */
    push_as(&t, W1, 1, 2.0f, 0, KD_DTYPE_BF16);
    /* 1/3 in bf16 is 0.333984375: the step's mean (1 + 2 + 0.333984375) / 3 applied in fp32 */
    push_as(&t, W2, 2, 1.0f / 3, 0, KD_DTYPE_BF16);
    CHECK(c->s.version == 1 && c->step_count == 0);
    const float mean = (1.0f + 2.0f + 0.333984375f) / 3;
    CHECK(fabsf(c->model->params[0] - (1.0f - LR * mean)) < 1e-6f);
    /* the weights reply: bf16 of the fp32 master */
    kd_msg_t msg;
    char err[KD_ERR_LEN];
    CHECK(kd_wire_recv(t.peer[W0], false, 0, &msg, err, sizeof err) == KD_WIRE_OK);
    const kd_layout_t bf16 = kd_layout_as(&KD_LAYOUT_WEIGHTS, KD_DTYPE_BF16);
    const uint16_t *w =
        kd_layout_get(&msg, &bf16, (int64_t[]){(int64_t)c->model->n_params}, err, sizeof err);
    CHECK(w && w[0] == kd_f32_to_bf16(c->model->params[0]));
    CHECK(kd_bf16_to_f32(kd_f32_to_bf16(c->model->params[0])) != c->model->params[0]);
    kd_msg_close(&msg);
    /* a NaN survives the 16 bits and is rejected, not applied */
    const long rejected = c->gradients_rejected;
    push_as(&t, W0, 3, NAN, 1, KD_DTYPE_BF16);
    CHECK(c->gradients_rejected == rejected + 1 && c->step_count == 0 && !c->applied[3]);
    rig_stop(&t);
}

/* cluster.accumulate 2: a push of two batches counts both in one update of their samples-
 * weighted mean; the answer says how many batches are left. More batches than accumulate, one
 * named twice or of another epoch are dropped; a push naming a counted batch is a duplicate
 * and its other batch goes back to its teacher. */
static void test_accumulate(void) {
    rig_t t;
    rig_start(&t, KD_CONSISTENCY_SYNC, 0, 2);
    coord_t *c = t.c;
    c->r.cluster.accumulate = 2;
    t.member[W2]->waiting_for_batch = true;
    push_batches(&t, W0, (uint32_t[]){0, 1}, 2, 1.0f, 0, KD_DTYPE_F32);
    CHECK(c->step_count == 1 && c->step_batches == 2 && c->in_step[0] && c->in_step[1]);
    push(&t, W1, 2, 4.0f, 0);
    /* (2 x BATCH x 1 + BATCH x 4) / (3 x BATCH) = 2 */
    CHECK(c->s.version == 1 && c->s.step == 1 && c->s.position == 3 && c->step_batches == 0);
    CHECK(fabsf(c->model->params[0] - (1.0f - LR * 2.0f)) < 1e-6f);
    CHECK(c->applied[0] && c->applied[1] && c->applied[2] && c->applied_count == 3);
    CHECK(reply_of(&t, W0) == WEIGHTS && last_batches_left == 1);
    CHECK(reply_of(&t, W1) == WEIGHTS);
    const long dropped = c->messages_dropped;
    push_batches(&t, W0, (uint32_t[]){3, 0, 1}, 3, 1.0f, 1, KD_DTYPE_F32); /* three */
    CHECK(reply_of(&t, W0) == DUPLICATE);
    push_batches(&t, W0, (uint32_t[]){3, 3}, 2, 1.0f, 1, KD_DTYPE_F32); /* one twice */
    CHECK(reply_of(&t, W0) == DUPLICATE);
    CHECK(c->messages_dropped == dropped + 2 && c->s.duplicates == 0 && c->step_count == 0);
    /* batch 3 with the counted batch 0: not applied, 3 streamed again, 0 a duplicate */
    push_batches(&t, W0, (uint32_t[]){3, 0}, 2, 1.0f, 1, KD_DTYPE_F32);
    CHECK(reply_of(&t, W0) == DUPLICATE && c->s.duplicates == 1 && !c->applied[3]);
    uint32_t ids[N_BATCHES];
    size_t n_ids = 0;
    CHECK(reply(&t, TEACHER, NULL, ids, &n_ids) == ASSIGN && n_ids == 1 && ids[0] == 3);
    /* its copy alone closes the epoch: every batch applied once */
    t.member[W1]->waiting_for_batch = true;
    push(&t, W0, 3, 1.0f, 1);
    CHECK(c->s.epoch == 1 && c->s.batches_applied == N_BATCHES && c->s.position == 4);
    rig_stop(&t);
}

/* Worker p pushes a top-k gradient (cluster.topk_fraction) for batch b: m (index, fp32 value)
 * pairs. */
static void push_topk(rig_t *t, int p, uint32_t b, const int32_t *index, const float *values,
                      size_t m, uint64_t version) {
    coord_t *c = t->c;
    Kdist__BatchRef ref = KDIST__BATCH_REF__INIT;
    ref.epoch = c->s.epoch;
    ref.batch_id = b;
    Kdist__PushGradient pg = KDIST__PUSH_GRADIENT__INIT;
    pg.ref = &ref;
    pg.samples = BATCH;
    pg.base_version = version;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_PUSH;
    env.push = &pg;
    kd_wire_tensor_t tensors[2] = {
        kd_layout_tensor(&KD_LAYOUT_GRADIENT_INDEX, (int64_t[]){(int64_t)m}),
        kd_layout_tensor(&KD_LAYOUT_GRADIENT_VALUES, (int64_t[]){(int64_t)m})};
    tensors[0].data = index;
    tensors[0].nbytes = m * sizeof *index;
    tensors[1].data = values;
    tensors[1].nbytes = m * sizeof *values;
    CHECK(kd_wire_send(t->peer[p], NULL, 0, &env, tensors, 2, 0) == 0);
    kd_msg_t msg;
    char err[KD_ERR_LEN];
    CHECK(kd_wire_recv(c->router, true, 0, &msg, err, sizeof err) == KD_WIRE_OK);
    member_t *mb = coord_find_member(c, msg.peer, msg.peer_len);
    if (mb) coord_on_push(c, mb, &msg);
    kd_msg_close(&msg);
}

/* cluster.topk_fraction: the pairs applied as a gradient that is zero elsewhere; indices out of
 * range or out of order are dropped, the weights untouched. */
static void test_topk_push(void) {
    rig_t t;
    rig_start(&t, KD_CONSISTENCY_SYNC, 0, 1);
    coord_t *c = t.c;
    c->r.cluster.topk_fraction = 0.25f;
    t.member[W1]->waiting_for_batch = t.member[W2]->waiting_for_batch = true;
    const size_t n = c->model->n_params;
    push_topk(&t, W0, 0, (int32_t[]){1, 4}, (float[]){2.0f, -1.0f}, 2, 0);
    CHECK(c->s.version == 1 && reply_of(&t, W0) == WEIGHTS && c->applied[0]);
    bool as_sent = true;
    for (size_t i = 0; i < n; i++) {
        const float g = i == 1 ? 2.0f : i == 4 ? -1.0f : 0.0f;
        as_sent = as_sent && fabsf(c->model->params[i] - (1.0f - LR * g)) < 1e-6f;
    }
    CHECK(as_sent);
    const float before = c->model->params[1];
    const long dropped = c->messages_dropped;
    push_topk(&t, W0, 1, (int32_t[]){2, (int32_t)n}, (float[]){1.0f, 1.0f}, 2, 1); /* outside */
    CHECK(reply_of(&t, W0) == DUPLICATE);
    push_topk(&t, W0, 1, (int32_t[]){3, 3}, (float[]){1.0f, 1.0f}, 2, 1); /* not ascending */
    CHECK(reply_of(&t, W0) == DUPLICATE);
    push_topk(&t, W0, 1, (int32_t[]){3}, (float[]){NAN}, 1, 1); /* a NaN: rejected */
    CHECK(reply_of(&t, W0) == DUPLICATE && c->gradients_rejected == 1);
    CHECK(c->messages_dropped == dropped + 2 && c->s.version == 1 && !c->applied[1]);
    CHECK(c->model->params[1] == before);
    rig_stop(&t);
}

/* ---- cluster.overlap: chunked pushes ------------------------------------------------------- */

/* The coordinator takes the next message off its ROUTER and handles it as a worker's. */
static void coordinator_takes(rig_t *t) {
    coord_t *c = t->c;
    kd_msg_t msg;
    char err[KD_ERR_LEN];
    CHECK(kd_wire_recv(c->router, true, 0, &msg, err, sizeof err) == KD_WIRE_OK);
    member_t *m = coord_find_member(c, msg.peer, msg.peer_len);
    const Kdist__Envelope__BodyCase body = msg.env->body_case; /* the push may be kept */
    if (m && body == KDIST__ENVELOPE__BODY_PUSH) coord_on_push(c, m, &msg);
    if (m && body == KDIST__ENVELOPE__BODY_GRADIENT_CHUNK) coord_on_gradient_chunk(c, m, &msg);
    kd_msg_close(&msg);
}

/* Worker p announces push `clock` for batch b on weights `version`, its gradient in chunks (of
 * L2 norm `norm`, 0 = not declared). */
static void push_chunked_norm(rig_t *t, int p, uint32_t b, uint64_t clock, uint64_t version,
                              float norm) {
    Kdist__BatchRef ref = KDIST__BATCH_REF__INIT;
    ref.epoch = t->c->s.epoch;
    ref.batch_id = b;
    Kdist__PushGradient pg = KDIST__PUSH_GRADIENT__INIT;
    pg.ref = &ref;
    pg.samples = BATCH;
    pg.base_version = version;
    pg.clock = clock;
    pg.chunks = 4;
    pg.gradient_norm = norm;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_PUSH;
    env.push = &pg;
    CHECK(kd_wire_send(t->peer[p], NULL, 0, &env, NULL, 0, 0) == 0);
    coordinator_takes(t);
}

static void push_chunked(rig_t *t, int p, uint32_t b, uint64_t clock, uint64_t version) {
    push_chunked_norm(t, p, b, clock, version, 0.0f);
}

/* ... and its gradient values [offset, offset + len), all `value` (fp32). */
static void send_chunk(rig_t *t, int p, uint64_t clock, size_t offset, size_t len, float value) {
    float values[64];
    for (size_t i = 0; i < len; i++) values[i] = value;
    Kdist__GradientChunk gc = KDIST__GRADIENT_CHUNK__INIT;
    gc.clock = clock;
    gc.offset = offset;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_GRADIENT_CHUNK;
    env.gradient_chunk = &gc;
    kd_wire_tensor_t tensor = kd_layout_tensor(&KD_LAYOUT_GRADIENT, (int64_t[]){(int64_t)len});
    tensor.data = values;
    tensor.nbytes = len * sizeof(float);
    CHECK(kd_wire_send(t->peer[p], NULL, 0, &env, &tensor, 1, 0) == 0);
    coordinator_takes(t);
}

static bool params_all(const coord_t *c, float value) {
    for (size_t i = 0; i < c->model->n_params; i++)
        if (c->model->params[i] != value) return false;
    return true;
}

/* One worker: each chunk applied as it comes and its new weights sent back at once (tentative,
 * the master kept whole for readers); committed at the last. Values that fail at the end, a
 * chunk out of turn or a reader in between undo what was applied, exactly; another worker's
 * push waits (redo); with two workers the chunks are assembled into an ordinary sync step. */
static void test_overlap_stream(void) {
    rig_t t;
    rig_start(&t, KD_CONSISTENCY_SYNC, 0, 1);
    coord_t *c = t.c;
    const size_t n = c->model->n_params; /* 15: chunks of 4, 4, 4, 3 */
    CHECK(n == 15);
    t.member[W1]->used = t.member[W2]->used = false;

    chunks_seen = 0;
    push_chunked(&t, W0, 0, 1, 0);
    send_chunk(&t, W0, 1, 0, 4, 1.0f);
    CHECK(reply_of(&t, W0) == NONE);
    CHECK(chunks_seen == 1 && chunk_version == 1 && chunk_weights[0] == 1.0f - LR);
    CHECK(c->s.version == 0 && c->weights_valid == false);
    uint8_t *snapshot = NULL; /* a reader now sees version 0 whole */
    kd_wire_tensor_t w = coord_weights_tensor(c);
    snapshot = zmq_msg_data(w.share);
    CHECK(((float *)snapshot)[0] == 1.0f && ((float *)snapshot)[14] == 1.0f);
    coord_invalidate_weights(c);
    send_chunk(&t, W0, 1, 4, 4, 1.0f);
    send_chunk(&t, W0, 1, 8, 4, 1.0f);
    CHECK(reply_of(&t, W0) == NONE && chunks_seen == 3);
    send_chunk(&t, W0, 1, 12, 3, 1.0f);
    CHECK(reply_of(&t, W0) == STREAMED && chunks_seen == 4);
    CHECK(c->s.version == 1 && c->applied[0] && c->pushes_streamed == 1);
    CHECK(params_all(c, 1.0f - LR));
    bool same = true;
    for (size_t i = 0; i < n; i++) same = same && chunk_weights[i] == c->model->params[i];
    CHECK(same);

    /* a NaN in the last chunk: rejected, the three chunks before it undone */
    const float before = c->model->params[0];
    push_chunked(&t, W0, 1, 2, 1);
    send_chunk(&t, W0, 2, 0, 4, 1.0f);
    send_chunk(&t, W0, 2, 4, 4, 1.0f);
    send_chunk(&t, W0, 2, 8, 4, 1.0f);
    CHECK(c->model->params[0] == before - LR); /* applied, tentatively */
    send_chunk(&t, W0, 2, 12, 3, NAN);
    CHECK(reply_of(&t, W0) == DUPLICATE && c->gradients_rejected == 1 && c->streams_undone == 1);
    CHECK(params_all(c, before) && c->s.version == 1 && !c->applied[1]);

    /* a chunk out of turn: dropped, undone; the rest of that push is ignored */
    const long dropped = c->messages_dropped;
    push_chunked(&t, W0, 1, 3, 1);
    send_chunk(&t, W0, 3, 0, 4, 1.0f);
    send_chunk(&t, W0, 3, 8, 4, 1.0f);
    CHECK(reply_of(&t, W0) == DUPLICATE && c->messages_dropped == dropped + 1);
    send_chunk(&t, W0, 3, 12, 3, 1.0f);
    CHECK(c->messages_dropped == dropped + 1 && params_all(c, before) && c->s.version == 1);

    /* a reader (a checkpoint, an evaluation) halfway: undone, the worker computes it again */
    push_chunked(&t, W0, 1, 4, 1);
    send_chunk(&t, W0, 4, 0, 4, 1.0f);
    coord_settle_weights(c);
    CHECK(reply_of(&t, W0) == REDO && params_all(c, before) && c->streams_undone == 3);
    send_chunk(&t, W0, 4, 4, 4, 1.0f);
    CHECK(c->messages_dropped == dropped + 1 && c->applying == NULL);

    /* a worker that joined meanwhile pushes: it waits for the half-applied update */
    push_chunked(&t, W0, 1, 5, 1);
    send_chunk(&t, W0, 5, 0, 4, 1.0f);
    t.member[W1]->used = true;
    push(&t, W1, 2, 1.0f, 1);
    CHECK(reply_of(&t, W1) == REDO && !c->in_step[2]);
    send_chunk(&t, W0, 5, 4, 4, 1.0f);
    send_chunk(&t, W0, 5, 8, 4, 1.0f);
    send_chunk(&t, W0, 5, 12, 3, 1.0f);
    CHECK(reply_of(&t, W0) == STREAMED && c->s.version == 2 && c->applied[1]);
    CHECK(params_all(c, before - LR));

    /* two workers: assembled, one step of their mean */
    push_chunked(&t, W0, 2, 6, 2);
    push_chunked(&t, W1, 3, 1, 2);
    CHECK(c->applying == NULL);
    for (size_t lo = 0; lo < n; lo += 4) {
        send_chunk(&t, W0, 6, lo, lo + 4 <= n ? 4 : n - lo, 1.0f);
        send_chunk(&t, W1, 1, lo, lo + 4 <= n ? 4 : n - lo, 3.0f);
    }
    /* the last batches of the run: both are told to stop */
    CHECK(reply_of(&t, W0) == STOP && reply_of(&t, W1) == STOP);
    CHECK(c->s.version == 3 && c->applied[2] && c->applied[3] && c->pushes_streamed == 2);
    CHECK(params_all(c, before - LR - 2.0f * LR));
    rig_stop(&t);
}

/* optim.clip_norm: the chunks clipped by the norm the push declares, as kd_optim_step clips the
 * whole gradient; a push whose gradient has another norm is rejected and undone. */
static void test_overlap_clip(void) {
    rig_t t;
    rig_start(&t, KD_CONSISTENCY_ASYNC, 0, 1);
    coord_t *c = t.c;
    t.member[W1]->used = t.member[W2]->used = false;
    c->opt->cfg.clip_norm = 1.0f;
    const size_t n = c->model->n_params;
    float ones[15], expected[15];
    for (size_t i = 0; i < n; i++) ones[i] = expected[i] = 1.0f;
    kd_optim_t *reference = kd_optim_new(&c->opt->cfg, n);
    const float norm = kd_optim_step(reference, expected, ones, LR); /* clips ones in place */
    kd_optim_destroy(&reference);
    push_chunked_norm(&t, W0, 0, 1, 0, norm);
    for (size_t lo = 0; lo < n; lo += 4) send_chunk(&t, W0, 1, lo, lo + 4 <= n ? 4 : n - lo, 1.0f);
    CHECK(reply_of(&t, W0) == STREAMED && c->pushes_streamed == 1);
    CHECK(memcmp(c->model->params, expected, n * sizeof(float)) == 0);
    push_chunked_norm(&t, W0, 1, 2, 1, norm * 2.0f); /* a norm the gradient does not have */
    for (size_t lo = 0; lo < n; lo += 4) send_chunk(&t, W0, 2, lo, lo + 4 <= n ? 4 : n - lo, 1.0f);
    CHECK(reply_of(&t, W0) == DUPLICATE && c->gradients_rejected == 1 && c->streams_undone == 1);
    CHECK(memcmp(c->model->params, expected, n * sizeof(float)) == 0 && c->s.version == 1);
    rig_stop(&t);
}

/* ---- the ledger ----------------------------------------------------------------------------- */

static void test_ledger(void) {
    rig_t t;
    rig_start(&t, KD_CONSISTENCY_ASYNC, 0, 1);
    coord_t *c = t.c;
    push(&t, W0, 1, 1.0f, 0);
    CHECK(c->s.version == 1 && c->applied[1] && reply_of(&t, W0) == WEIGHTS);
    /* the same batch again (a restream's second copy): a counted duplicate, not applied */
    float before = c->model->params[0];
    push(&t, W1, 1, 1.0f, 1);
    CHECK(c->s.duplicates == 1 && c->s.version == 1 && c->model->params[0] == before);
    CHECK(reply_of(&t, W1) == DUPLICATE);
    /* a non-finite gradient: rejected, the weights untouched, the batch back to its teacher */
    push(&t, W2, 2, NAN, 1);
    CHECK(c->gradients_rejected == 1 && !c->applied[2] && c->model->params[0] == before);
    CHECK(reply_of(&t, W2) == DUPLICATE);
    uint32_t ids[N_BATCHES];
    size_t n_ids = 0;
    CHECK(reply(&t, TEACHER, NULL, ids, &n_ids) == ASSIGN && n_ids == 1 && ids[0] == 2);
    CHECK(c->s.restreamed == 1);
    /* a batch id the run does not have: dropped */
    push(&t, W0, N_BATCHES + 3, 1.0f, 1);
    CHECK(c->messages_dropped == 1 && reply_of(&t, W0) == DUPLICATE);
    /* the rest: the only epoch completes, every batch applied exactly once */
    push(&t, W0, 0, 1.0f, 1);
    push(&t, W1, 2, 1.0f, 2);
    CHECK(c->phase == RUN_RUNNING);
    push(&t, W2, 3, 1.0f, 3);
    CHECK(c->phase == RUN_FINISHING && strcmp(c->status, "completed") == 0);
    CHECK(c->s.batches_applied == N_BATCHES && c->s.batches_expected == N_BATCHES);
    rig_stop(&t);
}

/* ---- SSP ------------------------------------------------------------------------------------ */

static void test_ssp_gate(void) {
    rig_t t;
    rig_start(&t, KD_CONSISTENCY_SSP, 1, 3);
    coord_t *c = t.c;
    /* w0 one clock ahead: within staleness 1, it goes on */
    push(&t, W0, 0, 1.0f, 0);
    CHECK(reply_of(&t, W0) == WEIGHTS && t.member[W0]->clock == 1);
    /* two ahead of w1 and w2 (clock 0): it waits */
    push(&t, W0, 1, 1.0f, 1);
    CHECK(reply_of(&t, W0) == WAIT && t.member[W0]->state == WORKER_HELD);
    CHECK(coord_min_clock(c) == 0);
    /* w1 catches up by one: the slowest (w2) is still at 0, w0 keeps waiting */
    push(&t, W1, 2, 1.0f, 2);
    CHECK(reply_of(&t, W1) == WEIGHTS && reply_of(&t, W0) == NONE);
    /* w2 pushes: the slowest is at 1, w0 (clock 2) is within staleness and released */
    push(&t, W2, 3, 1.0f, 3);
    CHECK(coord_min_clock(c) == 1);
    CHECK(reply_of(&t, W2) == WEIGHTS && reply_of(&t, W0) == WEIGHTS);
    CHECK(t.member[W0]->state == WORKER_COMPUTING);
    /* a worker without a batch does not count as the slowest */
    t.member[W2]->waiting_for_batch = true;
    t.member[W1]->waiting_for_batch = true;
    CHECK(coord_min_clock(c) == 2); /* w0 alone */
    push(&t, W0, 0, 1.0f, 4);       /* epoch 1 began: batch 0 again */
    push(&t, W0, 1, 1.0f, 5);
    CHECK(reply_of(&t, W0) == WEIGHTS); /* never held by the idle ones */
    CHECK(c->s.batches_applied == N_BATCHES + 2 && c->s.duplicates == 0);
    rig_stop(&t);
}

int main(void) {
    kd_log_init("test", "0", KD_LOG_WARN, NULL);
    test_sync_step();
    test_wire_bf16();
    test_accumulate();
    test_topk_push();
    test_overlap_stream();
    test_overlap_clip();
    test_ledger();
    test_ssp_gate();
    return kd_test_done("test_coord_step");
}
