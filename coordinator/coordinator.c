/* kdist-coordinator: the parameter server and control plane (DESIGN §2-3). It owns the
 * student's weights and optimizer, the membership, the per-epoch ledger of applied batches,
 * the assignment of batches to teacher nodes, evaluation, checkpoints and the run's outputs.
 * Message flow: docs/protocol.md. Single-threaded apart from the evaluator actor.
 *   usage: kdist-coordinator --recipe RECIPE --run-dir DIR [--resume] [--key FILE]
 *                            [section.key=value ...] */
#include "coord.h"

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
        json_t *j = coord_status_json(c);
        char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
        json_decref(j);
        if (!text) {
            coord_drop(c, msg, "cannot encode the status");
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
        coord_finish(c, "stopped");
        return;
    case KDIST__CONTROL__KIND__CHECKPOINT_NOW:
        coord_save_checkpoint(c);
        return;
    case KDIST__CONTROL__KIND__DRAIN:
        for (int i = 0; i < COORD_MAX_MEMBERS; i++) {
            member_t *m = &c->members[i];
            if (m->used && m->role == KDIST__ROLE__WORKER && strcmp(m->node_id, ctl->target) == 0) {
                m->drain = true;
                kd_log(KD_LOG_INFO, "COORD-DRAIN", "worker %s will stop after its step",
                       m->node_id);
                if (m->state != WORKER_PUSHED) coord_send_weights(c, m, REPLY_STOP);
            }
        }
        return;
    default:
        coord_drop(c, msg, "unknown control kind");
        return;
    }
}

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
            coord_drop(c, &msg, err);
        else if (msg.env->body_case == KDIST__ENVELOPE__BODY_CONTROL)
            on_control(c, &msg, FROM_LOCAL_CHANNEL);
        else
            coord_drop(c, &msg, "the control channel takes control commands only");
        kd_msg_close(&msg);
    }
}

static void on_message(coord_t *c, kd_msg_t *msg) {
    kd_env_t *env = msg->env;
    if (env->body_case == KDIST__ENVELOPE__BODY_HELLO) {
        coord_on_hello(c, msg);
        return;
    }
    if (env->body_case == KDIST__ENVELOPE__BODY_CONTROL) {
        on_control(c, msg, FROM_NETWORK);
        return;
    }
    member_t *m = coord_find_member(c, msg->peer, msg->peer_len);
    if (!m) {
        coord_send_refused(c, msg->peer, msg->peer_len, KDIST__REFUSAL_CODE__UNKNOWN_MEMBER,
                           "unknown member: say hello");
        coord_drop(c, msg, "message from a node that is not a member");
        return;
    }
    if (c->curve && strcmp(msg->user_id, m->curve_key) != 0) { /* a member is bound to its key */
        coord_drop(c, msg, "a message for a member from another key than the one it joined with");
        return;
    }
    m->last_seen = kd_now();
    switch (env->body_case) {
    case KDIST__ENVELOPE__BODY_HEARTBEAT:
        coord_on_heartbeat(c, m, env->heartbeat);
        return;
    case KDIST__ENVELOPE__BODY_PUSH:
        if (m->role != KDIST__ROLE__WORKER) break;
        coord_on_push(c, m, msg);
        return;
    case KDIST__ENVELOPE__BODY_GRADIENT_CHUNK:
        if (m->role != KDIST__ROLE__WORKER) break;
        coord_on_gradient_chunk(c, m, msg);
        return;
    case KDIST__ENVELOPE__BODY_NACK:
        if (m->role != KDIST__ROLE__WORKER) break;
        coord_on_nack(c, m, msg);
        return;
    case KDIST__ENVELOPE__BODY_GOODBYE:
        m->said_goodbye = true;
        coord_remove_member(c, m, "leave");
        return;
    default:
        break;
    }
    char why[96];
    snprintf(why, sizeof why, "a %s may not send '%s'", coord_role_name(m->role),
             kd_wire_body_name(env));
    coord_drop(c, msg, why);
}

static int run_loop(coord_t *c) {
    double last_housekeeping = 0;
    while (!kd_node_stop_requested || c->phase == RUN_RUNNING) {
        if (kd_node_stop_requested && c->phase == RUN_RUNNING) coord_finish(c, "stopped");
        if (c->phase == RUN_FINISHING && c->finish_deadline == 0) {
            coord_stop_nodes(c);
            c->finish_deadline = kd_now() + 3.0 * c->r.cluster.heartbeat_ms / 1000.0 + 1.0;
        }
        if (c->phase == RUN_FINISHING &&
            (coord_live_count(c, KDIST__ROLE__WORKER) + coord_live_count(c, KDIST__ROLE__TEACHER) ==
                 0 ||
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
                coord_drop(c, &msg, err);
                member_t *m = coord_find_member(c, msg.peer, msg.peer_len);
                if (m) m->last_seen = kd_now();
                continue;
            }
            on_message(c, &msg);
            kd_msg_close(&msg);
        }
        if (items[2].revents & ZMQ_POLLIN) serve_control_channel(c);
        eval_result_t res;
        while (evaluator_result(c->eval, &res) == 0) coord_handle_eval_result(c, &res);
        if (kd_now() - last_housekeeping >= 0.05) {
            coord_heartbeat_and_reap(c);
            coord_restream_stalled(c);
            if (!c->assigned && c->assign_at > 0 && kd_now() >= c->assign_at) coord_assign_epoch(c);
            kd_wire_refused(c->router_monitor, "the coordinator socket", &c->connections_refused);
            last_housekeeping = kd_now();
        }
    }
    return 0;
}

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
    if (kd_recipe_load(recipe, overrides, n_over, &c->r, err, errlen) != 0 ||
        kd_recipe_check_cluster(&c->r, recipe, err, errlen) != 0)
        return -1;
    if (setup_curve(c, recipe, key, err, errlen) != 0) return -1;
    char what[KD_PATH_MAX + 32];
    snprintf(what, sizeof what, "%s: cluster.bind", recipe);
    if (kd_curve_check_plaintext_bind(&c->r, c->r.cluster.bind, what, err, errlen) != 0) return -1;
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
    c->opt = kd_optim_for_model(&c->r.optim.cfg, c->model);
    c->sched = c->r.schedule.cfg;
    c->sched.total_steps = kd_train_total_steps(&c->r, c->data.train->n);
    c->n_batches = kd_epoch_count(c->data.train->n, (size_t)c->r.train.batch_size);
    coord_alloc_ledger(c);
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
                                .score = c->s.best_score,
                                .evals_since = (int)c->s.evals_since_best},
                     on_disk;
    if (resumed == 0 && evaluator_read_best(best, &on_disk) == 0 &&
        (to_beat.step < 0 || on_disk.score > to_beat.score)) {
        kd_log(KD_LOG_INFO, "COORD-RESUME-BEST",
               "%s holds the best so far (step %ld, score %.4f), newer than the checkpoint's", best,
               on_disk.step, on_disk.score);
        to_beat = (evaluator_best_t){.step = on_disk.step, .score = on_disk.score};
        c->s.best_step = on_disk.step;
        c->s.best_score = on_disk.score;
    }
    c->eval = evaluator_new(c->ctx, &c->r, c->model, &c->data, best, &to_beat);
    c->t0 = c->win_t0 = kd_now();
    coord_setup_shared_memory(c);
    if (resumed == 0) coord_add_event(c, "restart", "coordinator", "0"); /* from its checkpoint */

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
        coord_start_epoch(c, 0);
    else if (c->applied_count < c->n_batches)
        coord_assign_epoch(c); /* the checkpoint's epoch goes on */
    else if (c->s.epoch + 1 < (uint32_t)c->r.train.epochs)
        coord_start_epoch(c, c->s.epoch + 1);
    else
        coord_finish(c, "completed"); /* the checkpoint is the end of the run */

    if (run_loop(c) != 0) goto out;
    if (!c->status) c->status = "completed";
    coord_settle_weights(c); /* what is saved is a whole version */
    eval_result_t final = {0}, res;
    if (c->last_eval_step != c->s.step) coord_request_eval(c);
    /* every evaluation still to come is logged and counted, not only the last one */
    while (evaluator_next(c->eval, &res) == 0) coord_handle_eval_result(c, &res);
    if (c->have_eval && c->last_eval.step == c->s.step)
        final = c->last_eval; /* the final one, or it came in while the nodes said goodbye */
    n_path = snprintf(path, sizeof path, "%s/student.safetensors", c->run_dir);
    KD_ASSERT(n_path < (int)sizeof path); /* run_dir is bounded at set-up */
    bool saved = kd_checkpoint_save(c->model, path, err, sizeof err) == 0;
    if (!saved) {
        kd_log(KD_LOG_ERROR, "COORD-SAVE", "%s", err);
        coord_fail_run(c, "the final weights were not saved: %s", err);
    }
    coord_save_checkpoint(c);
    coord_write_metrics(c);
    /* 0 only for a run that ended as planned with its outputs written */
    exit_code =
        coord_write_summary(c, &final) == 0 && saved && strcmp(c->status, "failed") != 0 ? 0 : 1;
    kd_log(KD_LOG_INFO, "COORD-DONE",
           "%s after %ld steps: test accuracy %.4f, %ld/%ld batches applied, %ld duplicates",
           c->status, c->s.step, final.test.accuracy, c->s.batches_applied, c->s.batches_expected,
           c->s.duplicates);
out:
    evaluator_destroy(&c->eval);
    kd_metrics_close(&c->metrics);
    coord_invalidate_weights(c);
    for (int k = 0; k < c->step_count; k++) {
        kd_msg_close(&c->step_msgs[k]);
        free(c->step_copies[k]);
    }
    kd_wire_monitor_close(c->router, c->router_monitor);
    kd_socket_close_draining(c->router);
    close_control_channel(c);
    kd_zap_destroy(&c->zap);
    kd_curve_roles_free(&c->keys);
    if (c->ctx) zmq_ctx_term(c->ctx);
    kd_optim_destroy(&c->opt);
    kd_model_destroy(&c->model);
    kd_splits_destroy(&c->data);
    coord_free_ledger(c);
    return exit_code;
}
