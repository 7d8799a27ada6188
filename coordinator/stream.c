/* stream.c: pushes whose gradient comes in chunks (cluster.overlap). When the push is the only
 * gradient of its update, each chunk is applied as it arrives and that range's new weights go
 * straight back, so the gradient going up and the weights coming down share the link's time;
 * the values are checked once the last chunk is in, and the ranges applied are undone if they
 * fail. Otherwise the chunks are assembled and the push is taken like any other. */
#include "coord.h"

bool coord_other_push_applying(const coord_t *c, const member_t *m) {
    return c->applying && c->applying != m;
}

/* The ranges the half-applied push changed, put back: weights and optimizer moments. */
static void undo_applied(coord_t *c) {
    const member_t *m = c->applying;
    if (!m) return;
    const size_t bytes = m->chunk_next * sizeof(float);
    memcpy(c->model->params, c->undo_params, bytes);
    memcpy(c->opt->m, c->undo_m, bytes);
    if (c->opt->v) memcpy(c->opt->v, c->undo_v, bytes);
    c->applying = NULL;
    c->streams_undone++;
}

/* The gradient buffer goes back to the one c->wire_grad keeps for the next unpack. */
static void put_back_gradient(coord_t *c, float *grad) {
    if (!c->wire_grad)
        c->wire_grad = grad;
    else
        free(grad);
}

/* m's chunked push ends unanswered by it: undone if half applied; its other chunks ignored. */
void coord_end_chunked_push(coord_t *c, member_t *m) {
    if (!m->chunking) return;
    if (c->applying == m) undo_applied(c);
    kd_msg_close(&m->chunk_push);
    m->chunking = false;
    m->chunk_skip_clock = m->chunk_clock;
    put_back_gradient(c, m->chunk_grad);
    m->chunk_grad = NULL;
}

void coord_settle_weights(coord_t *c) {
    member_t *m = c->applying;
    if (!m) return;
    kd_log(KD_LOG_INFO, "COORD-STREAM-UNDONE",
           "push %llu of worker %s undone half applied (the weights are read whole now): it "
           "is computed again",
           (unsigned long long)m->chunk_clock, m->node_id);
    coord_end_chunked_push(c, m);
    coord_send_weights(c, m, REPLY_REDO);
}

void coord_pack_current_weights(coord_t *c, kd_dtype_t dtype, void *dst) {
    const size_t n = c->model->n_params, done = c->applying ? c->applying->chunk_next : 0;
    const size_t size = kd_dtype_size(dtype);
    if (done) kd_wire_pack_floats(dtype, c->undo_params, done, dst);
    kd_wire_pack_floats(dtype, c->model->params + done, n - done, (uint8_t *)dst + done * size);
}

void coord_on_chunked_push(coord_t *c, member_t *m, kd_msg_t *msg) {
    const Kdist__PushGradient *p = msg->env->push;
    const size_t n = c->model->n_params;
    if (m->chunking) { /* a worker pushes again only after an answer: that push is abandoned */
        coord_drop(c, &m->chunk_push, "a chunked push whose chunks stopped before the last");
        coord_end_chunked_push(c, m);
    }
    if (msg->n_tensors != 0 || p->shared_memory || p->chunks > n) {
        coord_drop(c, msg, "a chunked push with a gradient frame, or more chunks than values");
        m->chunk_skip_clock = p->clock;
        coord_send_weights(c, m, REPLY_DROPPED);
        return;
    }
    kd_msg_move(&m->chunk_push, msg);
    m->chunking = true;
    m->chunk_clock = m->chunk_push.env->push->clock;
    m->chunk_next = 0;
    m->chunk_last = kd_now();
    if (!m->chunk_grad) { /* all of it is written before it is read */
        m->chunk_grad = c->wire_grad ? c->wire_grad : kd_xmalloc(n * sizeof(float));
        c->wire_grad = NULL;
    }
    if (c->applying || !coord_push_streams(c, m, m->chunk_push.env->push)) return;
    c->applying = m;
    c->applying_lr = kd_schedule_lr(&c->sched, c->s.position);
    c->applying_scale = kd_optim_clip_scale(c->opt, m->chunk_push.env->push->gradient_norm);
    if (c->applying_scale < 1.0 && !c->clipped) c->clipped = kd_xmalloc(n * sizeof(float));
    if (!c->undo_params) {
        c->undo_params = kd_xmalloc(n * sizeof(float));
        c->undo_m = kd_xmalloc(n * sizeof(float));
        if (c->opt->v) c->undo_v = kd_xmalloc(n * sizeof(float));
    }
}

/* Range [lo, hi) of the applying push: updated after keeping what it overwrites, and its new
 * weights sent as the next version's (tentative until REPLY_STREAMED). */
static void apply_chunk(coord_t *c, member_t *m, size_t lo, size_t hi) {
    const size_t bytes = (hi - lo) * sizeof(float);
    memcpy(c->undo_params + lo, c->model->params + lo, bytes);
    memcpy(c->undo_m + lo, c->opt->m + lo, bytes);
    if (c->opt->v) memcpy(c->undo_v + lo, c->opt->v + lo, bytes);
    const float *grad = m->chunk_grad;
    if (c->applying_scale < 1.0) { /* clipped as kd_optim_step would, by the declared norm */
        kd_clip_scale_into(c->clipped + lo, grad + lo, hi - lo, c->applying_scale);
        grad = c->clipped;
    }
    kd_optim_update_range(c->opt, c->model->params, grad, c->applying_lr, lo, hi);

    const kd_dtype_t dtype = kd_wire_format_dtype(c->r.cluster.wire);
    const kd_layout_t layout = kd_layout_as(&KD_LAYOUT_WEIGHTS, dtype);
    kd_wire_tensor_t t = kd_layout_tensor(&layout, (int64_t[]){(int64_t)(hi - lo)});
    t.nbytes = (hi - lo) * kd_dtype_size(dtype);
    t.data = c->model->params + lo;
    if (dtype != KD_DTYPE_F32) {
        if (!c->chunk_out) c->chunk_out = kd_xmalloc(c->model->n_params * kd_dtype_size(dtype));
        kd_wire_pack_floats(dtype, c->model->params + lo, hi - lo, c->chunk_out);
        t.data = c->chunk_out;
    }
    Kdist__WeightsChunk wc = KDIST__WEIGHTS_CHUNK__INIT;
    wc.version = c->s.version + 1;
    wc.offset = lo;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_WEIGHTS_CHUNK;
    env.weights_chunk = &wc;
    coord_send_to(c, m, &env, &t, 1); /* copied now; a lost one shows at the commit */
}

/* With optim.clip_norm the chunks were clipped by the norm the push declared: it must be the
 * gradient's, bit for bit (false, with why set, if not). */
static bool declared_norm_holds(coord_t *c, const float *grad, const Kdist__PushGradient *p,
                                char *why, size_t whylen) {
    if (c->opt->cfg.clip_norm == 0.0f) return true;
    const float norm = kd_l2_norm(grad, c->model->n_params);
    if (norm == p->gradient_norm) return true;
    kd_err(why, whylen, "its norm is %.9g, not the %.9g it declared", (double)norm,
           (double)p->gradient_norm);
    return false;
}

/* All of m's gradient is in: committed or undone if it was applied, taken otherwise. */
static void last_chunk(coord_t *c, member_t *m) {
    kd_msg_t push;
    kd_msg_move(&push, &m->chunk_push);
    m->chunking = false;
    float *grad = m->chunk_grad;
    m->chunk_grad = NULL;
    if (c->applying != m) {
        free(c->wire_grad); /* assembled: from here on a push like any other */
        c->wire_grad = grad;
        coord_take_push(c, m, &push, grad);
        kd_msg_close(&push);
        return;
    }
    const Kdist__PushGradient *p = push.env->push;
    char err[KD_ERR_LEN];
    if (c->phase == RUN_FINISHING) {
        undo_applied(c);
        coord_send_weights(c, m, REPLY_STOP);
    } else if (coord_gradient_problem(c, grad, p, err, sizeof err) ||
               !declared_norm_holds(c, grad, p, err, sizeof err)) {
        undo_applied(c);
        coord_reject_push(c, m, p, err);
    } else {
        c->applying = NULL;
        c->pushes_streamed++;
        coord_commit_streamed_push(c, m, p);
    }
    put_back_gradient(c, grad);
    kd_msg_close(&push);
}

void coord_on_gradient_chunk(coord_t *c, member_t *m, kd_msg_t *msg) {
    const Kdist__GradientChunk *gc = msg->env->gradient_chunk;
    if (!m->chunking || gc->clock != m->chunk_clock) {
        if (gc->clock != m->chunk_skip_clock) coord_drop(c, msg, "a gradient chunk for no push");
        return;
    }
    const size_t n = c->model->n_params;
    const kd_dtype_t dtype = kd_wire_format_dtype(c->r.cluster.wire);
    const kd_layout_t layout = kd_layout_as(&KD_LAYOUT_GRADIENT, dtype);
    char err[KD_ERR_LEN];
    const void *values = kd_layout_get(msg, &layout, (int64_t[]){-1}, err, sizeof err);
    const size_t len = values ? (size_t)msg->env->tensors[0]->shape[0] : 0;
    if (values && (gc->offset != m->chunk_next || len == 0 || len > n - m->chunk_next)) {
        kd_err(err, sizeof err, "a gradient chunk of %zu values at %llu where %zu was due (of %zu)",
               len, (unsigned long long)gc->offset, m->chunk_next, n);
        values = NULL;
    }
    if (!values) {
        coord_drop(c, msg, err);
        coord_end_chunked_push(c, m);
        coord_send_weights(c, m, REPLY_DROPPED);
        return;
    }
    const size_t lo = m->chunk_next, hi = lo + len;
    kd_wire_unpack_floats(dtype, values, len, m->chunk_grad + lo);
    if (c->applying == m) apply_chunk(c, m, lo, hi);
    m->chunk_next = hi;
    m->chunk_last = kd_now();
    if (hi == n) last_chunk(c, m);
}

/* A live worker whose chunks stopped coming would hold a half-applied update (and every other
 * push) forever: after cluster.heartbeat_timeout_ms its push is dropped. */
void coord_check_chunk_stalls(coord_t *c) {
    const double now = kd_now(), timeout = c->r.cluster.heartbeat_timeout_ms / 1000.0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (!m->used || !m->chunking || now - m->chunk_last <= timeout) continue;
        coord_drop(c, &m->chunk_push, "a chunked push whose chunks stopped coming");
        coord_end_chunked_push(c, m);
        coord_send_weights(c, m, REPLY_DROPPED);
    }
}
