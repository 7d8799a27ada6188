/* members.c: membership: who is in the run (Hello, heartbeats, departures, eviction), and sending
 * to them. */
#include "coord.h"
#include "kd_tokens.h"

const char *coord_role_name(Kdist__Role role) {
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

void coord_add_teacher_counters(member_t *sum, const member_t *m) {
    sum->forward_samples += m->forward_samples;
    sum->cache_hits += m->cache_hits;
    sum->cache_misses += m->cache_misses;
    sum->cache_corrupt += m->cache_corrupt;
}

void coord_add_event(coord_t *c, const char *event, const char *role, const char *id) {
    if (c->n_events == COORD_MAX_EVENTS) {
        memmove(c->events, c->events + 1, sizeof c->events[0] * (COORD_MAX_EVENTS - 1));
        c->n_events--;
    }
    coord_event_t *e = &c->events[c->n_events++];
    e->time = coord_elapsed(c);
    snprintf(e->event, sizeof e->event, "%s", event);
    snprintf(e->role, sizeof e->role, "%s", role);
    snprintf(e->id, sizeof e->id, "%s", id);
}

void coord_drop(coord_t *c, const kd_msg_t *msg, const char *why) {
    c->messages_dropped++;
    if (kd_log_allow(&c->drop_limit, 1.0)) {
        char peer[300];
        kd_msg_peer_text(msg, peer, sizeof peer);
        kd_log(KD_LOG_WARN, "KD-WIRE-DROP", "dropped a message from '%s': %s (%ld dropped so far)",
               peer, why, c->messages_dropped);
    }
}

member_t *coord_find_member(coord_t *c, const uint8_t *rid, size_t len) {
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (m->used && m->rid_len == len && memcmp(m->rid, rid, len) == 0) return m;
    }
    return NULL;
}

int coord_live_count(coord_t *c, Kdist__Role role) {
    int n = 0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++)
        if (c->members[i].used && c->members[i].role == role) n++;
    return n;
}

int coord_send_to(coord_t *c, member_t *m, kd_env_t *env, const kd_wire_tensor_t *t, int n) {
    int rc = kd_wire_send(c->router, m->rid, m->rid_len, env, t, n, ZMQ_DONTWAIT);
    if (rc == 0)
        m->last_sent = kd_now();
    else if (kd_log_allow(&c->drop_limit, 1.0))
        kd_log(KD_LOG_WARN, "COORD-SEND-FAIL", "cannot send %s to %s %s: %s",
               kd_wire_body_name(env), coord_role_name(m->role), m->node_id, zmq_strerror(errno));
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

void coord_send_refused(coord_t *c, const uint8_t *rid, size_t len, Kdist__RefusalCode code,
                        const char *reason) {
    kd_wire_send_refused(c->router, rid, len, code, reason);
}

static void send_control(coord_t *c, member_t *m, Kdist__Control__Kind kind) {
    Kdist__Control ctl = KDIST__CONTROL__INIT;
    ctl.kind = kind;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
    env.control = &ctl;
    coord_send_to(c, m, &env, NULL, 0);
}

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
    char windows_fp[KD_CACHE_FP_HEX + 1], windows[256];
    if (c->data.train->tokens) {
        kd_tokens_windows_id(c->data.train, windows_fp, windows, sizeof windows);
        w.windows_fingerprint = windows_fp;
        w.windows = windows;
    }
    Kdist__SharedMemory offer = KDIST__SHARED_MEMORY__INIT;
    if (coord_offer_shared_memory(c, m, &offer)) w.shared_memory = &offer;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_WELCOME;
    env.welcome = &w;
    kd_wire_tensor_t t = coord_weights_tensor(c);
    coord_send_to(c, m, &env, &t, m->role == KDIST__ROLE__WORKER ? 1 : 0);
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
            coord_send_to(c, &c->members[i], &env, NULL, 0);
}

void coord_remove_member(coord_t *c, member_t *m, const char *event) {
    kd_log(KD_LOG_INFO, "COORD-MEMBER-GONE", "%s %s (%s) %s", coord_role_name(m->role), m->node_id,
           m->host, event);
    if (m->role != KDIST__ROLE__CLIENT)
        coord_add_event(c, event, coord_role_name(m->role), m->node_id);
    if (m->role != KDIST__ROLE__CLIENT &&
        (strcmp(event, "dead") == 0 || strcmp(event, "evicted") == 0) &&
        c->n_lost++ < COORD_MAX_LOST)
        c->lost[c->n_lost - 1] = c->events[c->n_events - 1];
    /* a sync step never waits for a worker that is gone; its collected gradient still counts */
    coord_keep_step_gradients(c, m);
    coord_end_chunked_push(c, m);
    coord_release_slot(c, m);
    kd_shm_close(&m->grad_shm);
    if (m->role == KDIST__ROLE__TEACHER) coord_add_teacher_counters(&c->teachers_gone, m);
    m->used = false;
    if (c->phase != RUN_RUNNING) return;
    if (m->role == KDIST__ROLE__WORKER) {
        if (c->r.cluster.consistency == KD_CONSISTENCY_SYNC && coord_sync_step_ready(c))
            coord_close_sync_step(c);
        if (c->r.cluster.consistency == KD_CONSISTENCY_SSP) coord_release_held_workers(c);
        /* the batch in its hands and those queued in its socket are gone with it */
        char why[160];
        snprintf(why, sizeof why, "worker %s %s", m->node_id,
                 strcmp(event, "dead") == 0 ? "died" : "left");
        coord_restream_unapplied(c, why);
    } else if (m->role == KDIST__ROLE__TEACHER) {
        coord_reassign_share(c, m);
        send_peers(c);
    }
}

/* A member that keeps sending unusable gradients while others' are applied is removed and may
 * not come back under its key. */
void coord_evict_member(coord_t *c, member_t *m, const char *why) {
    c->evicted++;
    kd_log(KD_LOG_WARN, "COORD-EVICT",
           "%s %s (%s) evicted: %ld gradients in a row rejected, the "
           "last because %s",
           coord_role_name(m->role), m->node_id, m->host, m->rejected_in_a_row, why);
    if (m->curve_key[0] &&
        c->n_evicted_keys < (int)(sizeof c->evicted_keys / sizeof c->evicted_keys[0]))
        snprintf(c->evicted_keys[c->n_evicted_keys++], sizeof c->evicted_keys[0], "%s",
                 m->curve_key);
    char reason[KD_ERR_LEN + 64];
    snprintf(reason, sizeof reason, "evicted: its gradients were rejected (%s)", why);
    coord_send_refused(c, m->rid, m->rid_len, KDIST__REFUSAL_CODE__EVICTED, reason);
    coord_remove_member(c, m, "evicted");
}

void coord_on_hello(coord_t *c, kd_msg_t *msg) {
    const Kdist__Hello *h = msg->env->hello;
    if (h->role != KDIST__ROLE__WORKER && h->role != KDIST__ROLE__TEACHER) {
        coord_send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__BAD_HELLO,
                           "only workers and teacher nodes say hello");
        coord_drop(c, msg, "hello from an unexpected role");
        return;
    }
    if (h->run_id[0] && strcmp(h->run_id, c->s.run_id) != 0) {
        char reason[256];
        snprintf(reason, sizeof reason, "this coordinator runs '%s', not '%s'", c->s.run_id,
                 h->run_id);
        coord_send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__WRONG_RUN, reason);
        return;
    }
    if (!h->node_id[0] || strlen(h->node_id) >= sizeof c->members[0].node_id ||
        (h->role == KDIST__ROLE__TEACHER &&
         (!h->stream_endpoint[0] || strlen(h->stream_endpoint) >= 256))) {
        coord_send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__BAD_HELLO,
                           "hello needs a node id (and a teacher endpoint)");
        coord_drop(c, msg, "hello with a missing or oversized field");
        return;
    }
    if (c->curve && !kd_curve_role_has(&c->keys, KD_CURVE_MEMBER, msg->user_id) &&
        !kd_curve_role_has(&c->keys,
                           h->role == KDIST__ROLE__WORKER ? KD_CURVE_WORKER : KD_CURVE_TEACHER,
                           msg->user_id)) {
        char reason[256];
        snprintf(reason, sizeof reason,
                 "key %s may not join as a %s: list it in cluster.security.%s or authorized_keys",
                 msg->user_id, coord_role_name(h->role),
                 h->role == KDIST__ROLE__WORKER ? "worker_keys" : "teacher_keys");
        coord_send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__NOT_AUTHORIZED,
                           reason);
        c->hellos_refused++;
        coord_drop(c, msg, "hello from a key without that role");
        return;
    }
    for (int i = 0; i < c->n_evicted_keys; i++)
        if (msg->user_id[0] && strcmp(c->evicted_keys[i], msg->user_id) == 0) {
            coord_send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__EVICTED,
                               "this key was evicted from the run");
            coord_drop(c, msg, "hello from an evicted key");
            return;
        }
    if (c->phase != RUN_RUNNING) {
        coord_send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__RUN_FINISHING,
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
                     coord_role_name(h->role), h->node_id);
            coord_send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__ID_IN_USE, reason);
            c->hellos_refused++;
            return;
        }
        coord_remove_member(c, old, "restart");
        restart = true;
    }
    member_t *m = coord_find_member(c, msg->peer, msg->peer_len);
    if (m) coord_remove_member(c, m, "restart");
    for (int i = 0; i < COORD_MAX_MEMBERS && !m; i++)
        if (!c->members[i].used) m = &c->members[i];
    if (!m) {
        coord_send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__TOO_MANY_MEMBERS,
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
    uint64_t lo = coord_min_clock(c);
    m->clock = lo == UINT64_MAX ? 0 : lo;
    kd_log(KD_LOG_INFO, "COORD-MEMBER-JOIN", "%s %s joined from %s (pid %u, incarnation %llu)",
           coord_role_name(m->role), m->node_id, m->host, m->pid,
           (unsigned long long)m->incarnation);
    if (!restart) /* a restart was recorded as the old one left */
        coord_add_event(c, "join", coord_role_name(m->role), m->node_id);
    send_welcome(c, m);
    if (m->role == KDIST__ROLE__WORKER) {
        int w = coord_live_count(c, KDIST__ROLE__WORKER);
        if (w > c->workers_max) c->workers_max = w;
        if (c->held && !c->started) coord_assign_epoch(c); /* maybe the one it waits for */
    } else {
        send_peers(c);
        /* The first Assign waits (briefly) for the recipe's teacher nodes, so nodes started
         * together share the epoch instead of the first one taking it all. */
        if (!c->assigned && ((c->held && !c->started) ||
                             coord_live_count(c, KDIST__ROLE__TEACHER) >= c->r.cluster.teachers))
            coord_assign_epoch(c);
        else if (!c->assigned && c->assign_at == 0)
            c->assign_at = kd_now() + TEACHER_GATHER_SECONDS;
    }
}

void coord_on_heartbeat(coord_t *c, member_t *m, const Kdist__Heartbeat *hb) {
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
        if (c->r.cluster.consistency == KD_CONSISTENCY_SYNC && coord_sync_step_ready(c))
            coord_close_sync_step(c);
        if (c->r.cluster.consistency == KD_CONSISTENCY_SSP) coord_release_held_workers(c);
    }
}

void coord_heartbeat_and_reap(coord_t *c) {
    double now = kd_now();
    double hb = c->r.cluster.heartbeat_ms / 1000.0,
           timeout = c->r.cluster.heartbeat_timeout_ms / 1000.0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (!m->used) continue;
        if (now - m->last_seen > timeout) {
            kd_log(KD_LOG_WARN, "COORD-MEMBER-DEAD", "%s %s silent for %.1f s: declared dead",
                   coord_role_name(m->role), m->node_id, now - m->last_seen);
            coord_remove_member(c, m, "dead");
            continue;
        }
        if (now - m->last_sent >= hb) {
            Kdist__Heartbeat h = KDIST__HEARTBEAT__INIT;
            kd_env_t env = KDIST__ENVELOPE__INIT;
            env.body_case = KDIST__ENVELOPE__BODY_HEARTBEAT;
            env.heartbeat = &h;
            if (coord_send_to(c, m, &env, NULL, 0) != 0 && errno == EHOSTUNREACH)
                m->last_sent = now; /* disconnected: the timeout decides */
        }
    }
    coord_check_chunk_stalls(c);
}

/* The end: stop every node, final evaluation, outputs. */
void coord_stop_nodes(coord_t *c) {
    /* A step still open when the run stops is not applied: its batches stay unapplied. */
    for (int k = 0; k < c->step_count; k++) {
        const Kdist__PushGradient *p = c->step_msgs[k].env->push;
        for (size_t i = 0; i < coord_push_batches(p); i++)
            c->in_step[coord_push_ref(p, i)->batch_id] = 0;
        kd_msg_close(&c->step_msgs[k]);
        free(c->step_copies[k]);
        c->step_copies[k] = NULL;
    }
    c->step_count = 0;
    c->step_batches = 0;
    for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
        member_t *m = &c->members[i];
        if (!m->used) continue;
        if (m->role == KDIST__ROLE__WORKER)
            coord_send_weights(c, m, REPLY_STOP);
        else if (m->role == KDIST__ROLE__TEACHER)
            send_control(c, m, KDIST__CONTROL__KIND__STOP);
    }
}
