/* status.c: what the run reports: evaluation results, metrics, checkpoints, StatusReply and
 * summary.json. */
#include "coord.h"

double coord_elapsed(coord_t *c) {
    return c->s.elapsed + (kd_now() - c->t0);
}

static void flush_metrics(coord_t *c, long step) {
    char err[KD_ERR_LEN];
    if (kd_metrics_flush(c->metrics, step, err, sizeof err) != 0)
        kd_log(KD_LOG_ERROR, "COORD-METRICS", "%s", err);
}

void coord_request_eval(coord_t *c) {
    coord_settle_weights(c);
    evaluator_request(c->eval, c->model->params, c->s.step);
    c->last_eval_step = c->s.step;
}

void coord_handle_eval_result(coord_t *c, const eval_result_t *res) {
    c->last_eval = *res;
    c->have_eval = true;
    c->s.best_score = res->best_score;
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
    if (c->model->gpt) {
        kd_metrics_scalar(c->metrics, "eval/val_perplexity", res->val.perplexity);
        kd_metrics_scalar(c->metrics, "eval/val_bits_per_byte", res->val.bits_per_byte);
        kd_metrics_scalar(c->metrics, "eval/test_perplexity", res->test.perplexity);
        kd_metrics_scalar(c->metrics, "eval/test_bits_per_byte", res->test.bits_per_byte);
    }
    flush_metrics(c, res->step);
    char err[KD_ERR_LEN];
    if (res->sample[0] && kd_metrics_text(c->metrics, "samples/student", res->sample, res->step,
                                          err, sizeof err) != 0)
        kd_log(KD_LOG_ERROR, "COORD-METRICS", "%s", err);
    if (c->model->gpt)
        kd_log(KD_LOG_INFO, "COORD-EVAL",
               "step %ld: val loss %.4f (%.4f bits per byte, perplexity %.3f, next-token "
               "accuracy %.4f), test loss %.4f%s",
               res->step, res->val.loss, res->val.bits_per_byte, res->val.perplexity,
               res->val.accuracy, res->test.loss, res->improved ? " (best)" : "");
    else
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

void coord_save_checkpoint(coord_t *c) {
    char err[KD_ERR_LEN];
    coord_settle_weights(c);
    c->s.elapsed = coord_elapsed(c);
    c->t0 = kd_now();
    if (c->weights_poisoned) return; /* the last finite checkpoint stays the newest */
    if (coord_checkpoint_save(c->ckpt_dir, &c->s, c->model, c->opt, c->applied, c->n_batches,
                              c->r.checkpoint.keep, err, sizeof err) != 0)
        kd_log(KD_LOG_ERROR, "COORD-CKPT-FAIL", "%s", err);
    c->last_ckpt_step = c->s.step;
}

void coord_write_metrics(coord_t *c) {
    double now = kd_now(), dt = now - c->win_t0;
    if (c->win_pushes == 0) return;
    kd_metrics_scalar(c->metrics, "train/loss", c->win_loss / (double)c->win_predictions);
    kd_metrics_scalar(c->metrics, "train/accuracy",
                      (double)c->win_correct / (double)c->win_predictions);
    kd_metrics_scalar(c->metrics, "train/lr", kd_schedule_lr(&c->sched, c->s.position));
    kd_metrics_scalar(c->metrics, "train/samples_per_sec", dt > 0 ? c->win_samples / dt : 0.0);
    if (c->model->gpt)
        kd_metrics_scalar(c->metrics, "train/tokens_per_sec",
                          dt > 0 ? c->win_predictions / dt : 0.0);
    kd_metrics_scalar(c->metrics, "cluster/workers", coord_live_count(c, KDIST__ROLE__WORKER));
    kd_metrics_scalar(c->metrics, "cluster/teachers", coord_live_count(c, KDIST__ROLE__TEACHER));
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
        snprintf(tag, sizeof tag, "memory/%s-%s", coord_role_name(m->role), m->node_id);
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
    c->win_samples = c->win_correct = c->win_pushes = c->win_steps = c->win_predictions = 0;
    memset(c->win_phase, 0, sizeof c->win_phase);
    memset(c->win_layer_fwd, 0, sizeof(double) * (size_t)c->model->n_layers);
    memset(c->win_layer_bwd, 0, sizeof(double) * (size_t)c->model->n_layers);
}

/* The teacher nodes' logit work over the run: forward passes and cache blocks. */
static json_t *teacher_work_json(coord_t *c) {
    member_t sum = c->teachers_gone;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (c->members[i].used && c->members[i].role == KDIST__ROLE__TEACHER)
            coord_add_teacher_counters(&sum, &c->members[i]);
    return json_pack("{s:I, s:I, s:I, s:I}", "forward_samples", (json_int_t)sum.forward_samples,
                     "cache_hits", (json_int_t)sum.cache_hits, "cache_misses",
                     (json_int_t)sum.cache_misses, "cache_corrupt", (json_int_t)sum.cache_corrupt);
}

json_t *coord_status_json(coord_t *c) {
    double t = coord_elapsed(c);
    long total = kd_train_total_steps(&c->r, c->data.train->n);
    double done = total > 0 ? (double)c->s.position / (double)total : 0.0;
    double rate = coord_train_rate(c);
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
    if (c->model->gpt)
        json_object_set_new(j, "tokens_per_sec", kd_json_number(rate * c->model->gpt->cfg.context));
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
        json_object_set_new(j, "loss", kd_json_number(c->win_loss / (double)c->win_predictions));
        json_object_set_new(j, "train_accuracy",
                            kd_json_number((double)c->win_correct / (double)c->win_predictions));
    }
    if (c->have_eval) {
        json_object_set_new(j, "val_accuracy", kd_json_number(c->last_eval.val.accuracy));
        json_object_set_new(j, "test_accuracy", kd_json_number(c->last_eval.test.accuracy));
        if (c->model->gpt)
            json_object_set_new(j, "val_bits_per_byte",
                                kd_json_number(c->last_eval.val.bits_per_byte));
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
            "{s:s, s:s, s:I, s:s, s:i, s:o, s:I, s:o, s:s, s:I}", "role", coord_role_name(m->role),
            "id", m->node_id, "incarnation", (json_int_t)m->incarnation, "host", m->host, "pid",
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

int coord_write_summary(coord_t *c, const eval_result_t *final) {
    double t = coord_elapsed(c);
    json_t *j = json_pack(
        "{s:s, s:s, s:s, s:o, s:o, s:o, s:o, s:I, s:o, s:I, s:I, s:o, s:o, s:i, s:I, s:s, "
        "s:{s:I, s:I, s:I, s:I, s:I, s:I}}",
        "status", c->status ? c->status : "completed", "name", c->r.name, "run_id", c->s.run_id,
        "test_accuracy", kd_json_number(final->test.accuracy), "test_loss",
        kd_json_number(final->test.loss), "val_accuracy", kd_json_number(final->val.accuracy),
        "val_loss", kd_json_number(final->val.loss), "best_step", (json_int_t) final->best_step,
        c->model->gpt ? "best_val_loss" : "best_val_accuracy",
        kd_json_number(c->model->gpt ? -final->best_score : final->best_score), "epochs",
        (json_int_t)(c->applied_count == c->n_batches ? c->s.epoch + 1 : c->s.epoch), "steps",
        (json_int_t)c->s.step, "samples_per_sec", kd_json_number(coord_train_rate(c)),
        "wall_seconds", kd_json_number(t), "workers_max", c->workers_max, "parameters",
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
    /* what samples_per_sec counts: samples applied by this coordinator process, over the time
     * from its first push to its last applied step */
    json_object_set_new(j, "samples_trained", json_integer(c->samples_applied));
    json_t *ledger = json_object_get(j, "ledger");
    json_object_set_new(ledger, "connections_refused", json_integer(c->connections_refused));
    json_object_set_new(ledger, "gradients_rejected", json_integer(c->gradients_rejected));
    json_object_set_new(ledger, "nacks", json_integer(c->nacks));
    json_object_set_new(ledger, "members_evicted", json_integer(c->evicted));
    json_object_set_new(ledger, "hellos_refused", json_integer(c->hellos_refused));
    json_object_set_new(ledger, "control_refused", json_integer(c->control_refused));
    json_object_set_new(ledger, "pushes_streamed", json_integer(c->pushes_streamed));
    json_object_set_new(ledger, "streams_undone", json_integer(c->streams_undone));
    json_t *lost = json_array();
    for (long i = 0; i < c->n_lost && i < COORD_MAX_LOST; i++)
        json_array_append_new(lost, json_pack("{s:s, s:s, s:s, s:o}", "role", c->lost[i].role, "id",
                                              c->lost[i].id, "event", c->lost[i].event, "time",
                                              kd_json_number(c->lost[i].time)));
    json_object_set_new(j, "members_lost", lost);
    json_object_set_new(j, "members_lost_total", json_integer(c->n_lost));
    json_object_set_new(j, "teacher", teacher_work_json(c));
    if (c->model->gpt && c->r.distill.loss.alpha > 0) { /* what one position's teacher cost */
        kd_lm_teacher_t format;
        kd_lm_teacher_format(&c->r, c->model->num_classes, &format);
        json_t *work = json_object_get(j, "teacher");
        json_object_set_new(work, "encoding",
                            json_string(kd_cache_encoding_name(format.key.encoding)));
        json_object_set_new(work, "record_bytes_per_token",
                            json_integer((json_int_t)format.record_bytes));
    }
    if (c->model->gpt) {
        json_object_set_new(j, "tokens_per_sec",
                            kd_json_number(coord_train_rate(c) * c->model->gpt->cfg.context));
        kd_json_set_lm_eval(j, "val", final->val.perplexity, final->val.bits_per_byte);
        kd_json_set_lm_eval(j, "test", final->test.perplexity, final->test.bits_per_byte);
    }
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
