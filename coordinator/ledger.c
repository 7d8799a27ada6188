/* ledger.c: the epoch's ledger: which batches are applied, assigned to which teacher node, streamed
 * again or refused (Nacks). */
#include "coord.h"

void coord_alloc_ledger(coord_t *c) {
    const size_t n = c->n_batches ? c->n_batches : 1;
    c->applied = kd_xcalloc(n, 1);
    c->in_step = kd_xcalloc(n, 1);
    c->nacked = kd_xcalloc(n, sizeof *c->nacked);
    c->owner = kd_xcalloc(n, sizeof *c->owner);
    c->step_grad = kd_alloc_floats(c->model->n_params);
    c->win_layer_fwd = kd_xcalloc((size_t)c->model->n_layers, sizeof(double));
    c->win_layer_bwd = kd_xcalloc((size_t)c->model->n_layers, sizeof(double));
}

void coord_free_ledger(coord_t *c) {
    free(c->applied);
    free(c->in_step);
    free(c->nacked);
    free(c->owner);
    free(c->step_grad);
    free(c->wire_grad);
    free(c->undo_params);
    free(c->undo_m);
    free(c->undo_v);
    free(c->chunk_out);
    free(c->clipped);
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        if (c->members[i].chunking) kd_msg_close(&c->members[i].chunk_push);
        free(c->members[i].chunk_grad);
    }
    free(c->win_layer_fwd);
    free(c->win_layer_bwd);
}

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
        if (k || !restream) coord_send_to(c, teachers[t], &env, NULL, 0);
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

void coord_assign_epoch(coord_t *c) {
    if (coord_live_count(c, KDIST__ROLE__TEACHER) == 0)
        return; /* the first teacher's Hello assigns */
    const int workers = coord_live_count(c, KDIST__ROLE__WORKER);
    const int teachers = coord_live_count(c, KDIST__ROLE__TEACHER);
    if (!c->started && (workers < c->r.cluster.start_workers ||
                        teachers < c->r.cluster.start_teachers)) { /* a Hello assigns */
        if (!c->held)
            kd_log(KD_LOG_INFO, "COORD-HOLD",
                   "the first batches wait for %ld workers and %ld teacher nodes "
                   "(cluster.start_workers, cluster.start_teachers), %d and %d so far",
                   c->r.cluster.start_workers, c->r.cluster.start_teachers, workers, teachers);
        c->held = true;
        c->assign_at = 0; /* no gather timer: the Hello that completes the count assigns */
        return;
    }
    c->started = true;
    uint32_t *ids = kd_xmalloc((c->n_batches ? c->n_batches : 1) * sizeof *ids);
    size_t n = unapplied_batches(c, ids);
    assign_batches(c, ids, n, false);
    free(ids);
    c->assigned = true;
    c->assign_at = 0;
    c->last_progress = kd_now();
    kd_log(KD_LOG_INFO, "COORD-EPOCH", "epoch %u: %zu batches to %d teacher node(s)", c->s.epoch, n,
           coord_live_count(c, KDIST__ROLE__TEACHER));
}

void coord_start_epoch(coord_t *c, uint32_t epoch) {
    c->s.epoch = epoch;
    memset(c->applied, 0, c->n_batches);
    memset(c->in_step, 0, c->n_batches);
    memset(c->nacked, 0, c->n_batches * sizeof *c->nacked);
    c->applied_count = 0;
    c->s.batches_expected += (long)c->n_batches;
    c->assigned = false;
    coord_assign_epoch(c);
}

/* A teacher node is gone: the batches of this epoch it held and that are not applied go to the
 * live ones at once (those it streamed before it died may still come back: the ledger drops
 * the second copy). With no teacher left, the next one to say hello gets the whole rest. */
void coord_reassign_share(coord_t *c, const member_t *gone) {
    if (!c->assigned) return;
    const int index = (int)(gone - c->members);
    uint32_t *ids = kd_xmalloc((c->n_batches ? c->n_batches : 1) * sizeof *ids);
    size_t n = 0;
    for (size_t b = 0; b < c->n_batches; b++)
        if (c->owner[b] == index && !c->applied[b] && !c->in_step[b]) ids[n++] = (uint32_t)b;
    if (coord_live_count(c, KDIST__ROLE__TEACHER) == 0) {
        c->assigned = false;
        kd_log(KD_LOG_WARN, "COORD-NO-TEACHER",
               "no teacher node left: epoch %u waits for one to join", c->s.epoch);
    } else if (n) {
        assign_batches(c, ids, n, true);
        kd_log(KD_LOG_INFO, "COORD-REASSIGN",
               "teacher %s is gone: its %zu unapplied batch(es) of epoch %u go to %d live "
               "teacher node(s)",
               gone->node_id, n, c->s.epoch, coord_live_count(c, KDIST__ROLE__TEACHER));
    }
    free(ids);
}

/* Asks the teachers for every unapplied batch of the epoch again. A teacher streams the ones
 * still in its queue once (it merges the lists); the ones streamed but not pushed back come
 * again, and if the first copy was only late the ledger drops the second. */
void coord_restream_unapplied(coord_t *c, const char *why) {
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
void coord_restream_stalled(coord_t *c) {
    if (kd_now() - c->last_progress < c->r.cluster.restream_timeout_ms / 1000.0) return;
    char why[96];
    snprintf(why, sizeof why, "no batch applied for %.1f s", kd_now() - c->last_progress);
    coord_restream_unapplied(c, why);
}

void coord_mark_applied(coord_t *c, const Kdist__BatchRef *ref) {
    c->applied[ref->batch_id] = 1;
    c->in_step[ref->batch_id] = 0;
    c->applied_count++;
    c->s.batches_applied++;
}

/* The batch of a rejected or refused push goes back to its teacher (it was never applied). */
void coord_requeue_batch(coord_t *c, const Kdist__BatchRef *ref) {
    if (c->phase != RUN_RUNNING || !c->assigned || !ref || ref->epoch != c->s.epoch ||
        ref->batch_id >= c->n_batches || c->applied[ref->batch_id] || c->in_step[ref->batch_id])
        return;
    uint32_t id = ref->batch_id;
    assign_batches(c, &id, 1, true);
    c->s.restreamed++;
}

size_t coord_push_batches(const Kdist__PushGradient *p) {
    return 1 + p->n_accumulated;
}

const Kdist__BatchRef *coord_push_ref(const Kdist__PushGradient *p, size_t i) {
    return i == 0 ? p->ref : p->accumulated[i - 1];
}

void coord_requeue_push(coord_t *c, const Kdist__PushGradient *p) {
    for (size_t i = 0; i < coord_push_batches(p); i++) coord_requeue_batch(c, coord_push_ref(p, i));
}

uint64_t coord_batches_left(const coord_t *c) {
    if (c->phase != RUN_RUNNING) return 0;
    return (uint64_t)(c->n_batches - c->applied_count - c->step_batches);
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
void coord_on_nack(coord_t *c, member_t *m, kd_msg_t *msg) {
    const Kdist__Nack *n = msg->env->nack;
    const Kdist__BatchRef *ref = n->ref;
    if (!ref || ref->batch_id >= c->n_batches) {
        coord_drop(c, msg, "nack for a batch that does not exist");
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
        coord_fail_run(
            c,
            "batch %u/%u was refused %u times by workers because of %s (%s): fix the data or "
            "the teacher, or raise cluster.max_nacks",
            ref->epoch, ref->batch_id, times, nack_reason_name(n->reason), detail);
        return;
    }
    coord_requeue_batch(c, ref);
}
