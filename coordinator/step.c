/* step.c: applying gradients: validation, the sync step, the SSP gate, async updates, and what
 * follows a step. */
#include "coord.h"

void coord_finish(coord_t *c, const char *status) {
    if (c->phase == RUN_FINISHING) return;
    c->status = status;
    c->phase = RUN_FINISHING;
}

void coord_fail_run(coord_t *c, const char *fmt, ...) {
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
    if (c->win_steps >= c->r.logging.every_steps) coord_write_metrics(c);
    if (c->r.eval.every_steps > 0 && c->s.step % c->r.eval.every_steps == 0) coord_request_eval(c);
    if (c->r.checkpoint.every_steps > 0 && c->s.step % c->r.checkpoint.every_steps == 0)
        coord_save_checkpoint(c);
    if (c->r.train.max_steps > 0 && c->s.step >= c->r.train.max_steps) {
        coord_finish(c, "completed");
        return;
    }
    if (c->applied_count < c->n_batches) return;
    kd_log(KD_LOG_INFO, "COORD-EPOCH-DONE", "epoch %u complete: %zu/%zu batches applied once",
           c->s.epoch, c->applied_count, c->n_batches);
    if (c->r.eval.every_steps == 0) coord_request_eval(c);
    if (c->s.epoch + 1 >= (uint32_t)c->r.train.epochs) {
        coord_finish(c, "completed");
        return;
    }
    coord_start_epoch(c, c->s.epoch + 1);
}

/* What follows every update of the weights: the check that they stayed finite, the step
 * counters and a new snapshot for the replies. */
static void weights_updated(coord_t *c, long batches, long samples) {
    size_t bad = kd_first_nonfinite(c->model->params, c->model->n_params);
    if (bad < c->model->n_params) {
        c->weights_poisoned = true;
        coord_fail_run(
            c,
            "the weights became non-finite at step %ld (parameter %zu is %g) from finite "
            "gradients: the update overflowed; try a lower optim.lr. The weights are not "
            "saved; the last checkpoint and best/ hold the last finite ones",
            c->s.step + 1, bad, (double)c->model->params[bad]);
    }
    c->s.position += batches;
    c->s.step++;
    c->s.version++;
    coord_invalidate_weights(c);
    c->last_progress = c->last_apply = kd_now();
    c->samples_applied += samples;
}

static void apply_gradient(coord_t *c, float *grad, long batches, long samples) {
    kd_optim_step(c->opt, c->model->params, grad, kd_schedule_lr(&c->sched, c->s.position));
    weights_updated(c, batches, samples);
}

/* Samples per second of training, from the first push to the last update. */
double coord_train_rate(coord_t *c) {
    double dt = c->last_apply - c->first_push;
    return c->first_push > 0 && dt > 0 ? (double)c->samples_applied / dt : 0.0;
}

/* Accounts a push's statistics into the metrics window and the worker's rate. */
static void account_push(coord_t *c, member_t *m, const Kdist__PushGradient *p) {
    c->win_loss += p->loss_sum;
    c->win_samples += p->samples;
    c->win_predictions += c->model->gpt ? (long)p->tokens : (long)p->samples;
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

/* A top-k push (cluster.topk_fraction): its (index, value) pairs scattered into a dense fp32
 * gradient, zero elsewhere; NULL with why set if the pairs do not check out. */
static float *push_topk_gradient(coord_t *c, kd_msg_t *msg, kd_dtype_t dtype, char *why,
                                 size_t whylen) {
    const size_t n = c->model->n_params;
    const int32_t *index =
        kd_layout_get(msg, &KD_LAYOUT_GRADIENT_INDEX, (int64_t[]){-1}, why, whylen);
    if (!index) return NULL;
    const int64_t m = msg->env->tensors[0]->shape[0];
    if (m < 1 || (uint64_t)m > n) {
        kd_err(why, whylen, "top-k gradient of %lld values (1..%zu allowed)", (long long)m, n);
        return NULL;
    }
    const kd_layout_t layout = kd_layout_as(&KD_LAYOUT_GRADIENT_VALUES, dtype);
    const void *values = kd_layout_get(msg, &layout, (int64_t[]){m}, why, whylen);
    if (!values) return NULL;
    if (!c->wire_grad) c->wire_grad = kd_xmalloc(n * sizeof(float));
    if (kd_wire_unpack_topk(dtype, index, values, (size_t)m, n, c->wire_grad, why, whylen) != 0)
        return NULL;
    return c->wire_grad; /* a sync step takes it over, as a 16-bit one */
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
    const size_t n = c->model->n_params;
    const kd_dtype_t dtype = kd_wire_format_dtype(c->r.cluster.wire);
    if (msg->n_tensors == 2) return push_topk_gradient(c, msg, dtype, why, whylen);
    const kd_layout_t layout = kd_layout_as(&KD_LAYOUT_GRADIENT, dtype);
    float *frame = (float *)kd_layout_get(msg, &layout, (int64_t[]){(int64_t)n}, why, whylen);
    if (!frame || dtype == KD_DTYPE_F32) return frame;
    /* 16 bits on the wire: summed and applied in fp32 (a sync step takes the buffer over) */
    if (!c->wire_grad) c->wire_grad = kd_xmalloc(n * sizeof(float)); /* all of it written now */
    kd_wire_unpack_floats(dtype, frame, n, c->wire_grad);
    return c->wire_grad;
}

/* A worker leaves while the open sync step holds its shared-memory gradient: keep a copy. */
void coord_keep_step_gradients(coord_t *c, member_t *m) {
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

bool coord_sync_step_ready(coord_t *c) {
    if (c->step_count == 0) return false;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (!m->used || m->role != KDIST__ROLE__WORKER) continue;
        if (m->state != WORKER_PUSHED && !m->waiting_for_batch) return false;
    }
    return true;
}

static void mark_push_applied(coord_t *c, const Kdist__PushGradient *p) {
    for (size_t i = 0; i < coord_push_batches(p); i++) coord_mark_applied(c, coord_push_ref(p, i));
}

/* Closes the open sync step: one update from the samples-weighted mean of its gradients. */
void coord_close_sync_step(coord_t *c) {
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
    apply_gradient(c, grad, (long)c->step_batches, samples);
    for (int k = 0; k < c->step_count; k++) {
        mark_push_applied(c, c->step_msgs[k].env->push);
        kd_msg_close(&c->step_msgs[k]);
        if (c->step_copies[k] && !c->wire_grad)
            c->wire_grad = c->step_copies[k]; /* the next unpack reuses it (all are n_params) */
        else
            free(c->step_copies[k]);
        c->step_copies[k] = NULL;
    }
    int count = c->step_count;
    c->step_count = 0;
    c->step_batches = 0;
    for (int k = 0; k < count; k++) {
        member_t *m = &c->members[c->step_member[k]];
        if (m->used && m->state == WORKER_PUSHED) coord_send_weights(c, m, coord_go_on(c));
    }
    after_step(c);
    /* the end of the run is known only now: tell the collected workers */
    if (c->phase == RUN_FINISHING)
        for (int k = 0; k < count; k++) {
            member_t *m = &c->members[c->step_member[k]];
            if (m->used && m->state == WORKER_COMPUTING) coord_send_weights(c, m, REPLY_STOP);
        }
}

/* SSP: a worker may go on while it is at most `staleness` clocks ahead of the slowest. */
uint64_t coord_min_clock(coord_t *c) {
    uint64_t lo = UINT64_MAX;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (m->used && m->role == KDIST__ROLE__WORKER && !m->waiting_for_batch && m->clock < lo)
            lo = m->clock;
    }
    return lo;
}

void coord_release_held_workers(coord_t *c) {
    uint64_t lo = coord_min_clock(c);
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (m->used && m->role == KDIST__ROLE__WORKER && m->state == WORKER_HELD &&
            (lo == UINT64_MAX || m->clock <= lo + (uint64_t)c->r.cluster.staleness))
            coord_send_weights(c, m, coord_go_on(c));
    }
}

/* Why a gradient must not reach the optimizer (true, with why set): a non-finite loss or value,
 * or a norm beyond cluster.max_gradient_norm. One pass in double, so huge values do not
 * overflow the sum. */
bool coord_gradient_problem(coord_t *c, const float *grad, const Kdist__PushGradient *p, char *why,
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

/* A gradient collected into a sync step or applied: the rejection streaks end. */
static void accept_push(coord_t *c, member_t *m) {
    c->pushes_accepted++;
    c->rejected_in_a_row = 0;
    m->rejected_in_a_row = 0;
}

/* A gradient that failed coord_gradient_problem: counted, never applied; its batch goes back to the
 * queue. A member whose streak goes on while others' gradients are applied is evicted; a
 * streak across the whole cluster (training diverged) fails the run. */
void coord_reject_push(coord_t *c, member_t *m, const Kdist__PushGradient *p, const char *why) {
    c->gradients_rejected++;
    c->rejected_in_a_row++;
    if (m->rejected_in_a_row++ == 0) m->accepted_at_first_rejection = c->pushes_accepted;
    char more[48] = "";
    if (p->n_accumulated) snprintf(more, sizeof more, " (and %zu accumulated)", p->n_accumulated);
    if (kd_log_allow(&c->drop_limit, 1.0))
        kd_log(KD_LOG_WARN, "COORD-GRADIENT-REJECTED",
               "gradient of batch %u/%u%s from %s %s rejected: %s (%ld rejected so far)",
               p->ref->epoch, p->ref->batch_id, more, coord_role_name(m->role), m->node_id, why,
               c->gradients_rejected);
    coord_requeue_push(c, p);
    if (c->rejected_in_a_row >= c->r.cluster.fail_after) {
        coord_send_weights(c, m, REPLY_DROPPED);
        coord_fail_run(c,
                       "the last %ld gradients pushed were all rejected (the last because %s): the "
                       "training diverged or every worker is broken; try a lower optim.lr or "
                       "optim.clip_norm",
                       c->rejected_in_a_row, why);
        return;
    }
    if (m->rejected_in_a_row >= c->r.cluster.evict_after &&
        c->pushes_accepted > m->accepted_at_first_rejection) {
        coord_evict_member(c, m, why);
        return;
    }
    coord_send_weights(c, m, REPLY_DROPPED);
}

/* Samples within a batch; loss and correct over the predictions: per sample, or a language
 * model's per token (samples x context). */
static bool push_counters_possible(const coord_t *c, const Kdist__PushGradient *p) {
    const uint64_t per_sample = c->model->gpt ? (uint64_t)c->model->gpt->cfg.context : 0;
    const uint64_t predictions = per_sample ? p->tokens : p->samples;
    const uint64_t batches = coord_push_batches(p);
    return p->samples >= batches && p->samples <= batches * (uint64_t)c->r.train.batch_size &&
           p->tokens == p->samples * per_sample && p->correct <= predictions;
}

/* Why a push's batches cannot be one accumulated gradient (true, with why set): more than
 * cluster.accumulate of them, one that does not exist, two epochs, or one named twice. */
static bool push_refs_impossible(const coord_t *c, const Kdist__PushGradient *p, char *why,
                                 size_t whylen) {
    const size_t n = coord_push_batches(p);
    if (n > (size_t)c->r.cluster.accumulate) {
        kd_err(why, whylen, "push of %zu batches (cluster.accumulate is %ld)", n,
               c->r.cluster.accumulate);
        return true;
    }
    for (size_t i = 0; i < n; i++) {
        const Kdist__BatchRef *ref = coord_push_ref(p, i);
        if (ref->batch_id >= c->n_batches || ref->epoch >= (uint32_t)c->r.train.epochs) {
            kd_err(why, whylen, "push for a batch that does not exist");
            return true;
        }
        if (ref->epoch != p->ref->epoch) {
            kd_err(why, whylen, "push summing batches of epochs %u and %u", p->ref->epoch,
                   ref->epoch);
            return true;
        }
        for (size_t j = 0; j < i; j++)
            if (coord_push_ref(p, j)->batch_id == ref->batch_id) {
                kd_err(why, whylen, "push naming batch %u twice", ref->batch_id);
                return true;
            }
    }
    return false;
}

/* How many of a push's batches are already applied or in the open step (or of a past epoch). */
static size_t push_duplicates(const coord_t *c, const Kdist__PushGradient *p) {
    size_t dup = 0;
    for (size_t i = 0; i < coord_push_batches(p); i++) {
        const Kdist__BatchRef *ref = coord_push_ref(p, i);
        dup += ref->epoch < c->s.epoch || c->applied[ref->batch_id] || c->in_step[ref->batch_id];
    }
    return dup;
}

/* A push computed on weights or batches this coordinator never handed out: the worker was
 * ahead of the checkpoint a restarted coordinator resumed from. */
static bool push_from_the_future(const coord_t *c, const Kdist__PushGradient *p) {
    return p->ref->epoch > c->s.epoch || p->base_version > c->s.version;
}

/* Whether a chunked push (cluster.overlap) may be applied chunk by chunk as it arrives: it is
 * the only gradient of its update (one worker, sync or async; never an SSP gate), it will be
 * accepted whatever its values (they are checked at its last chunk, and the chunks applied so
 * far are undone if they fail), and, with optim.clip_norm, it declares its norm. */
bool coord_push_streams(coord_t *c, const member_t *m, const Kdist__PushGradient *p) {
    char why[KD_ERR_LEN];
    const bool clip_known =
        c->opt->cfg.clip_norm == 0.0f || (p->gradient_norm > 0 && isfinite(p->gradient_norm));
    return c->r.cluster.consistency != KD_CONSISTENCY_SSP && clip_known &&
           coord_live_count(c, KDIST__ROLE__WORKER) == 1 && c->phase == RUN_RUNNING &&
           c->step_count == 0 && m->state != WORKER_PUSHED && p->base_version == c->s.version &&
           isfinite(p->loss_sum) && push_counters_possible(c, p) &&
           !push_refs_impossible(c, p, why, sizeof why) && !push_from_the_future(c, p) &&
           push_duplicates(c, p) == 0;
}

/* The end of a push applied chunk by chunk (coord_push_streams): its values checked out and
 * the optimizer has updated every range, so it becomes the step its chunks already sent. */
void coord_commit_streamed_push(coord_t *c, member_t *m, const Kdist__PushGradient *p) {
    if (c->first_push == 0) c->first_push = kd_now();
    m->waiting_for_batch = false;
    accept_push(c, m);
    account_push(c, m, p);
    kd_optim_end_step(c->opt);
    weights_updated(c, (long)coord_push_batches(p), p->samples);
    mark_push_applied(c, p);
    m->clock++;
    coord_send_weights(c, m, REPLY_STREAMED);
    after_step(c);
    if (c->phase == RUN_FINISHING && m->state == WORKER_COMPUTING)
        coord_send_weights(c, m, REPLY_STOP);
}

void coord_on_push(coord_t *c, member_t *m, kd_msg_t *msg) {
    const Kdist__PushGradient *p = msg->env->push;
    char err[KD_ERR_LEN];
    coord_note_weights_held(c, m, p->base_version);
    if (p->ref && p->chunks) {
        coord_on_chunked_push(c, m, msg);
        return;
    }
    float *grad = p->ref ? push_gradient(c, m, msg, err, sizeof err) : NULL;
    if (!grad) {
        coord_drop(c, msg, p->ref ? err : "push without a batch reference");
        coord_send_weights(c, m, REPLY_DROPPED); /* a member is never left without an answer */
        return;
    }
    coord_take_push(c, m, msg, grad);
}

void coord_take_push(coord_t *c, member_t *m, kd_msg_t *msg, float *grad) {
    const Kdist__PushGradient *p = msg->env->push;
    char err[KD_ERR_LEN];
    if (!push_counters_possible(c, p)) {
        coord_drop(c, msg, "push with impossible counters");
        coord_send_weights(c, m, REPLY_DROPPED); /* a member is never left without an answer */
        return;
    }
    if (push_refs_impossible(c, p, err, sizeof err)) {
        coord_drop(c, msg, err);
        coord_send_weights(c, m, REPLY_DROPPED);
        return;
    }
    m->waiting_for_batch = false;
    if (c->phase == RUN_FINISHING) {
        coord_send_weights(c, m, REPLY_STOP);
        return;
    }
    if (coord_other_push_applying(c,
                                  m)) { /* another push is half applied: again, on what follows */
        coord_send_weights(c, m, REPLY_REDO);
        return;
    }
    if (coord_gradient_problem(c, grad, p, err, sizeof err)) {
        coord_reject_push(c, m, p, err);
        return;
    }
    if (c->first_push == 0) c->first_push = kd_now();
    const Kdist__BatchRef *ref = p->ref;
    const size_t batches = coord_push_batches(p);
    /* Dropped, not counted; the batch comes again when its epoch does. */
    if (push_from_the_future(c, p)) {
        c->stale_dropped++;
        coord_send_weights(c, m, REPLY_DROPPED);
        return;
    }
    const size_t duplicates = push_duplicates(c, p);
    if (duplicates) {
        c->s.duplicates += (long)duplicates;
        kd_log(KD_LOG_INFO, "COORD-DUPLICATE", "batch %u/%u from %s-%s already counted%s: dropped",
               ref->epoch, ref->batch_id, coord_role_name(m->role), m->node_id,
               batches > 1 ? " (or one accumulated with it; the others are streamed again)" : "");
        coord_requeue_push(c, p); /* those summed with a counted one come again */
        coord_send_weights(c, m, REPLY_DROPPED);
        return;
    }
    switch (c->r.cluster.consistency) {
    case KD_CONSISTENCY_SYNC:
        if (m->state == WORKER_PUSHED) { /* one batch per worker per step: it awaits the close */
            coord_drop(c, msg, "a second push in one sync step");
            return;
        }
        if (p->base_version < c->s.version) { /* its step closed without it: same batch again */
            coord_send_weights(c, m, REPLY_REDO);
            return;
        }
        if (c->step_count == COORD_MAX_MEMBERS)
            coord_close_sync_step(c); /* churn cannot overflow it */
        accept_push(c, m);
        account_push(c, m, p);
        for (size_t i = 0; i < batches; i++) c->in_step[coord_push_ref(p, i)->batch_id] = 1;
        c->step_batches += batches;
        c->step_member[c->step_count] = (int)(m - c->members);
        c->step_grads[c->step_count] = grad;
        if (grad == c->wire_grad) { /* unpacked from 16 bits: the step owns the buffer */
            c->step_copies[c->step_count] = grad;
            c->wire_grad = NULL;
        }
        kd_msg_move(&c->step_msgs[c->step_count++], msg); /* the step owns it now */
        m->state = WORKER_PUSHED;
        m->clock++;
        if (coord_sync_step_ready(c)) coord_close_sync_step(c);
        return;
    case KD_CONSISTENCY_ASYNC:
    case KD_CONSISTENCY_SSP:
        accept_push(c, m);
        account_push(c, m, p);
        apply_gradient(c, grad, (long)batches, p->samples);
        mark_push_applied(c, p);
        m->clock++;
        bool hold = c->r.cluster.consistency == KD_CONSISTENCY_SSP &&
                    coord_min_clock(c) != UINT64_MAX &&
                    m->clock > coord_min_clock(c) + (uint64_t)c->r.cluster.staleness;
        coord_send_weights(c, m, hold ? REPLY_WAIT : REPLY_WEIGHTS);
        after_step(c);
        if (c->r.cluster.consistency == KD_CONSISTENCY_SSP) coord_release_held_workers(c);
        if (c->phase == RUN_FINISHING && m->state == WORKER_COMPUTING)
            coord_send_weights(c, m, REPLY_STOP);
        return;
    }
}
