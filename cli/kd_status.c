/* kdist status: asks a running coordinator for its StatusReply and prints progress, ledger,
 * membership and recent events. Also home of what `kdist run` shares with it: the control
 * client and the StatusReply.json parser (kd_cli.h). */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kd_cli.h"
#include "kd_curve.h"
#include "kd_node.h"
#include "kd_session.h"
#include "kd_util.h"

#define STATUS_DEADLINE_MS 2000

/* ---- control client ---------------------------------------------------------------------- */

struct cli_client {
    void *ctx;
    kd_session_t *session; /* Hello when asked, refusals, the CurveZMQ handshake verdicts */
    char endpoint[KD_PATH_MAX];
    bool have_last; /* the last control, sent again after a Hello */
    Kdist__Control__Kind last_kind;
    char last_target[128];
};

/* Whether the environment names a key for this client: kd_curve_client_from_args, the one place
 * that reads KDIST_KEY, finds a key there or fails on one it cannot use. */
static bool env_names_key(void) {
    kd_curve_client_t probe;
    bool on;
    char why[KD_ERR_LEN];
    return kd_curve_client_from_args(NULL, NULL, NULL, &probe, &on, why, sizeof why) != 0 || on;
}

/* What run_dir/recipe.yaml says about the run's CurveZMQ: 1 with the client's key file
 * (<keys_dir>/client.key) and the coordinator's public key (may be ""), 0 for a plaintext run
 * (or no recipe there), -1 with err set. */
static int run_client_key(const char *run_dir, char *key, size_t keylen, char *server,
                          size_t serverlen, char *err, size_t errlen) {
    char path[KD_PATH_MAX + 32], why[KD_ERR_LEN];
    snprintf(path, sizeof path, "%s/recipe.yaml", run_dir);
    if (!kd_file_exists(path)) return 0; /* nothing to learn: plaintext unless told */
    kd_recipe_t *r = kd_xmalloc(sizeof *r);
    int rc = 1;
    if (kd_recipe_load(path, NULL, 0, r, why, sizeof why) != 0) {
        rc = kd_err(err, errlen, "cannot tell whether the run uses CurveZMQ: %s", why);
    } else if (!r->cluster.security.curve) {
        rc = 0;
    } else {
        const char *dir = r->cluster.security.keys_dir;
        snprintf(key, keylen, "%s/client.key", dir);
        snprintf(server, serverlen, "%s", r->cluster.security.coordinator_key);
        if (!dir[0] || !kd_file_exists(key))
            rc = kd_err(err, errlen,
                        "the run in %s uses CurveZMQ: give --key FILE (a key pair whose public "
                        "key is in its cluster.security.authorized_keys) or set %s%s%s%s",
                        run_dir, KD_CURVE_ENV_KEY, dir[0] ? " (" : "", dir[0] ? key : "",
                        dir[0] ? " does not exist)" : "");
    }
    free(r);
    return rc;
}

int cli_curve_credentials(const char *key_opt, const char *server_opt, const char *run_dir,
                          kd_curve_client_t *out, bool *on, char *err, size_t errlen) {
    if (key_opt || !run_dir || env_names_key())
        return kd_curve_client_from_args(key_opt, server_opt, NULL, out, on, err, errlen);
    char key[KD_PATH_MAX + 32], server[KD_PATH_MAX], why[KD_ERR_LEN];
    int found = run_client_key(run_dir, key, sizeof key, server, sizeof server, err, errlen);
    if (found < 0) return -1;
    if (found == 0) /* a plaintext run: --coordinator-key alone is the error it is elsewhere */
        return kd_curve_client_from_args(NULL, server_opt, NULL, out, on, err, errlen);
    if (kd_curve_client_from_args(key, server_opt, server, out, on, why, sizeof why) != 0)
        return kd_err(err, errlen, "the run in %s uses CurveZMQ with %s as the client's key: %s",
                      run_dir, key, why);
    return 0;
}

cli_client_t *cli_client_new(const char *endpoint, const kd_curve_client_t *curve, char *err,
                             size_t errlen) {
    cli_client_t *c = kd_xcalloc(1, sizeof *c);
    snprintf(c->endpoint, sizeof c->endpoint, "%s", endpoint);
    c->ctx = zmq_ctx_new();
    if (!c->ctx) {
        kd_err(err, errlen, "cannot create a ZeroMQ context: %s", zmq_strerror(errno));
        cli_client_destroy(&c);
        return NULL;
    }
    char node_id[32];
    snprintf(node_id, sizeof node_id, "%d", (int)getpid());
    kd_session_config_t cfg = {
        .role = KDIST__ROLE__CLIENT, .node_id = node_id, .endpoint = endpoint, .curve = curve};
    c->session = kd_session_new(c->ctx, &cfg);
    if (kd_session_connect(c->session, err, errlen) != 0) cli_client_destroy(&c);
    return c;
}

void cli_client_destroy(cli_client_t **cp) {
    if (!cp || !*cp) return;
    cli_client_t *c = *cp;
    kd_session_destroy(&c->session);
    if (c->ctx) zmq_ctx_term(c->ctx);
    free(c);
    *cp = NULL;
}

void *cli_client_socket(cli_client_t *c) {
    return kd_session_socket(c->session);
}

static int client_send_control(cli_client_t *c, char *err, size_t errlen) {
    kd_env_t env = KDIST__ENVELOPE__INIT;
    Kdist__Control ctl = KDIST__CONTROL__INIT;
    ctl.kind = c->last_kind;
    ctl.target = c->last_target;
    env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
    env.control = &ctl;
    return kd_session_send(c->session, &env, NULL, 0, err, errlen);
}

int cli_client_control(cli_client_t *c, Kdist__Control__Kind kind, const char *target, char *err,
                       size_t errlen) {
    c->have_last = true;
    c->last_kind = kind;
    snprintf(c->last_target, sizeof c->last_target, "%s", target ? target : "");
    return client_send_control(c, err, errlen);
}

/* One session event for a client: 0 go on, -1 an error (err says why). After a Hello (the
 * coordinator asked for one) the last control goes again. */
static int client_event(cli_client_t *c, kd_session_event_t ev, char *err, size_t errlen) {
    switch (ev) {
    case KD_SESSION_HELLO:
        return c->have_last ? client_send_control(c, err, errlen) : 0;
    case KD_SESSION_END:
    case KD_SESSION_FATAL:
        return -1;
    default: /* a malformed reply is dropped, as from any peer; a lost connection comes back */
        return 0;
    }
}

int cli_client_wait_status(cli_client_t *c, int timeout_ms, char **json, char *err, size_t errlen) {
    *json = NULL;
    double deadline = kd_now() + timeout_ms / 1000.0;
    for (;;) {
        kd_msg_t msg;
        kd_session_event_t ev = kd_session_recv(c->session, &msg, err, errlen);
        if (ev == KD_SESSION_WELCOME || ev == KD_SESSION_MESSAGE) {
            bool status = msg.env->body_case == KDIST__ENVELOPE__BODY_STATUS && msg.env->status &&
                          msg.env->status->json;
            if (status) *json = kd_xstrdup(msg.env->status->json);
            kd_msg_close(&msg);
            if (status) return 0;
            continue;
        }
        if (ev != KD_SESSION_IDLE) {
            if (client_event(c, ev, err, errlen) != 0) return -1;
            continue;
        }
        /* the handshake verdicts: a refused key or a mismatch is an error at once */
        double now = kd_now();
        if (client_event(c, kd_session_tick(c->session, now, err, errlen), err, errlen) != 0)
            return -1;
        int left = (int)((deadline - now) * 1000.0);
        if (left <= 0) return 1;
        double session = kd_session_deadline(c->session);
        if (session < deadline) left = (int)((session - now) * 1000.0) + 1;
        if (left < 0) left = 0;
        /* the monitor too: a refused handshake is news as soon as it happens */
        zmq_pollitem_t items[2] = {{kd_session_socket(c->session), 0, ZMQ_POLLIN, 0},
                                   {kd_session_monitor(c->session), 0, ZMQ_POLLIN, 0}};
        int n = items[0].socket ? (items[1].socket ? 2 : 1) : 0;
        if (zmq_poll(n ? items : NULL, n, left) < 0) {
            if (errno == EINTR) return 1;
            return kd_err(err, errlen, "polling %s: %s", c->endpoint, zmq_strerror(errno));
        }
    }
}

int cli_client_status(cli_client_t *c, int timeout_ms, char **json, char *err, size_t errlen) {
    *json = NULL;
    if (cli_client_control(c, KDIST__CONTROL__KIND__STATUS, NULL, err, errlen) != 0) return -1;
    double deadline = kd_now() + timeout_ms / 1000.0;
    for (;;) {
        int left = (int)((deadline - kd_now()) * 1000.0);
        int got = cli_client_wait_status(c, left > 0 ? left : 0, json, err, errlen);
        if (got <= 0) return got;
        long unfinished = kd_session_unfinished_handshakes(c->session);
        if (left <= 0 && unfinished > 0)
            return kd_err(err, errlen,
                          "the coordinator at %s did not answer within %.1f s and closed %ld "
                          "connection(s) before the handshake ended, as one that uses CurveZMQ "
                          "does to a client without a key: give --key FILE and --coordinator-key",
                          c->endpoint, timeout_ms / 1000.0, unfinished);
        if (left <= 0)
            return kd_err(err, errlen, "the coordinator at %s did not answer within %.1f s",
                          c->endpoint, timeout_ms / 1000.0);
    }
}

/* ---- StatusReply.json ---------------------------------------------------------------------- */

static double json_num(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

static long json_long(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    return json_is_number(v) ? (long)json_number_value(v) : -1;
}

static const char *json_str(const json_t *o, const char *key, const char *fallback) {
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : fallback;
}

int cli_progress_parse(const char *json, cli_progress_t *p, char *err, size_t errlen) {
    json_error_t jerr;
    json_t *root = json_loads(json, 0, &jerr);
    if (!json_is_object(root)) {
        json_decref(root);
        return kd_err(err, errlen, "StatusReply.json is not a JSON object: %s", jerr.text);
    }
    snprintf(p->status, sizeof p->status, "%s", json_str(root, "status", "?"));
    snprintf(p->name, sizeof p->name, "%s", json_str(root, "name", "?"));
    p->epoch = json_long(root, "epoch");
    p->epochs = json_long(root, "epochs");
    p->step = json_long(root, "step");
    p->total_steps = json_long(root, "total_steps");
    p->batches_applied = json_long(root, "batches_applied");
    p->batches_expected = json_long(root, "batches_expected");
    p->duplicates_dropped = json_long(root, "duplicates_dropped");
    p->restreamed = json_long(root, "restreamed");
    p->loss = json_num(root, "loss");
    p->lr = json_num(root, "lr");
    p->train_accuracy = json_num(root, "train_accuracy");
    p->val_accuracy = json_num(root, "val_accuracy");
    p->test_accuracy = json_num(root, "test_accuracy");
    p->samples_per_sec = json_num(root, "samples_per_sec");
    p->tokens_per_sec = json_num(root, "tokens_per_sec");
    p->val_bits_per_byte = json_num(root, "val_bits_per_byte");
    p->elapsed = json_num(root, "elapsed");
    p->eta = json_num(root, "eta");
    p->workers_live = p->teachers_live = 0;
    size_t i;
    json_t *m;
    json_array_foreach(json_object_get(root, "members"), i, m) {
        const char *role = json_str(m, "role", "");
        if (strcmp(role, "worker") == 0) p->workers_live++;
        if (strcmp(role, "teacher") == 0) p->teachers_live++;
    }
    json_decref(root);
    return 0;
}

void cli_format_duration(double s, char *out, size_t n) {
    if (!isfinite(s) || s < 0) {
        snprintf(out, n, "-");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(out, n, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else if (t >= 60)
        snprintf(out, n, "%ldm%02lds", t / 60, t % 60);
    else
        snprintf(out, n, "%lds", t);
}

/* "84.10%" or "-" */
static void fmt_pct(double v, char *out, size_t n) {
    if (isfinite(v))
        snprintf(out, n, "%.2f%%", 100.0 * v);
    else
        snprintf(out, n, "-");
}

/* The reply counts epochs from 0 and reaches `epochs` once the last one is done; people count
 * from 1 and never past the end. */
static long display_epoch(const cli_progress_t *p) {
    long e = p->epoch >= 0 ? p->epoch + 1 : 0;
    return p->epochs > 0 && e > p->epochs ? p->epochs : e;
}

/* v with fmt (one double conversion), or "-" when unknown */
static void fmt_num(double v, const char *fmt, char *out, size_t n) {
    if (isfinite(v))
        snprintf(out, n, fmt, v);
    else
        snprintf(out, n, "-");
}

void cli_progress_line(const cli_progress_t *p, char *out, size_t n) {
    char eta[32], val[32], loss[32];
    cli_format_duration(p->step > 0 ? p->eta : NAN, eta, sizeof eta); /* no rate yet */
    const bool lm = !isnan(p->tokens_per_sec); /* a language model: per token */
    if (lm)
        fmt_num(p->val_bits_per_byte, "%.4f", val, sizeof val);
    else
        fmt_pct(p->val_accuracy, val, sizeof val);
    fmt_num(p->loss, "%.4f", loss, sizeof loss);
    double pct = p->total_steps > 0 ? 100.0 * (double)p->step / (double)p->total_steps : 0.0;
    const double rate = lm ? p->tokens_per_sec : p->samples_per_sec;
    snprintf(out, n,
             "epoch %ld/%ld  step %ld/%ld (%.0f%%)  loss %s  %s %s  %.0f %s/s  %d worker%s  "
             "ETA %s",
             display_epoch(p), p->epochs > 0 ? p->epochs : 0, p->step > 0 ? p->step : 0,
             p->total_steps > 0 ? p->total_steps : 0, pct, loss, lm ? "val bpb" : "val acc", val,
             isfinite(rate) ? rate : 0.0, lm ? "tokens" : "samples", p->workers_live,
             p->workers_live == 1 ? "" : "s", eta);
}

/* ---- kdist status ------------------------------------------------------------------------ */

static void status_usage(FILE *out) {
    fprintf(out, "usage: kdist status [RUN_DIR|ENDPOINT] [--json | --follow] [--key FILE]\n"
                 "                    [--coordinator-key FILE|Z85]\n"
                 "  default: the newest run under ./runs that has a coordinator.endpoint\n"
                 "  --follow: then print joins, leaves, deaths and restarts as they happen,\n"
                 "            with a progress line, until the run ends (Ctrl-C to stop)\n"
                 "  --key, --coordinator-key: CurveZMQ credentials (default: $KDIST_KEY and\n"
                 "            $KDIST_COORDINATOR_KEY; for a RUN_DIR whose recipe sets\n"
                 "            cluster.security.curve, <keys_dir>/client.key and its\n"
                 "            coordinator_key)\n");
}

int cli_read_endpoint(const char *dir, char *out, size_t outlen, char *err, size_t errlen) {
    char path[KD_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/coordinator.endpoint", dir);
    uint8_t *data = NULL;
    size_t len = 0;
    if (!kd_file_exists(path))
        return kd_err(err, errlen,
                      "%s does not exist: no coordinator is running for %s (or it has finished)",
                      path, dir);
    if (kd_read_file(path, &data, &len, err, errlen) != 0) return -1;
    while (len > 0 && (data[len - 1] == '\n' || data[len - 1] == ' ' || data[len - 1] == '\r'))
        data[--len] = 0;
    if (len == 0 || len >= outlen) {
        free(data);
        return kd_err(err, errlen, "%s: expected one endpoint line", path);
    }
    snprintf(out, outlen, "%s", (const char *)data);
    free(data);
    return 0;
}

/* The run under runs_dir whose coordinator.endpoint is the newest. */
static int newest_run(const char *runs_dir, char *out, size_t outlen, char *err, size_t errlen) {
    DIR *d = opendir(runs_dir);
    if (!d)
        return kd_err(err, errlen, "cannot open %s (name a RUN_DIR or an ENDPOINT instead): %s",
                      runs_dir, strerror(errno));
    double best = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[KD_PATH_MAX + 300];
        snprintf(path, sizeof path, "%s/%s/coordinator.endpoint", runs_dir, e->d_name);
        struct stat st;
        if (stat(path, &st) != 0) continue;
        double t = (double)st.st_mtim.tv_sec + 1e-9 * (double)st.st_mtim.tv_nsec;
        if (t > best) {
            best = t;
            snprintf(out, outlen, "%s/%s", runs_dir, e->d_name);
        }
    }
    closedir(d);
    if (best < 0)
        return kd_err(err, errlen, "no run under %s has a coordinator.endpoint (none running?)",
                      runs_dir);
    return 0;
}

static void print_status(const char *endpoint, const char *json, bool with_events) {
    json_t *root = json_loads(json, 0, NULL);
    cli_progress_t p;
    char err[KD_ERR_LEN];
    if (!json_is_object(root) || cli_progress_parse(json, &p, err, sizeof err) != 0) {
        printf("unreadable status from %s:\n%s\n", endpoint, json);
        json_decref(root);
        return;
    }
    char elapsed[32], eta[32], tr[32], val[32], test[32];
    cli_format_duration(p.elapsed, elapsed, sizeof elapsed);
    cli_format_duration(p.step > 0 ? p.eta : NAN, eta, sizeof eta);
    fmt_pct(p.train_accuracy, tr, sizeof tr);
    fmt_pct(p.val_accuracy, val, sizeof val);
    fmt_pct(p.test_accuracy, test, sizeof test);
    printf("%-10s %s (run id %s) at %s\n", "run", p.name, json_str(root, "run_id", "?"), endpoint);
    printf("%-10s %s\n", "status", p.status);
    printf("%-10s epoch %ld/%ld  step %ld/%ld (%.1f%%)  elapsed %s  ETA %s\n", "progress",
           display_epoch(&p), p.epochs, p.step, p.total_steps,
           p.total_steps > 0 ? 100.0 * (double)p.step / (double)p.total_steps : 0.0, elapsed, eta);
    char loss[32], lr[32];
    fmt_num(p.loss, "%.4f", loss, sizeof loss);
    fmt_num(p.lr, "%.4g", lr, sizeof lr);
    printf("%-10s loss %s  lr %s  train acc %s  val acc %s  test acc %s\n", "training", loss, lr,
           tr, val, test);
    printf("%-10s %.0f samples/s, %d worker%s, %d teacher%s\n", "speed",
           isfinite(p.samples_per_sec) ? p.samples_per_sec : 0.0, p.workers_live,
           p.workers_live == 1 ? "" : "s", p.teachers_live, p.teachers_live == 1 ? "" : "s");
    printf("%-10s %ld/%ld batches applied this epoch, %ld duplicates dropped, %ld restreamed\n",
           "ledger", p.batches_applied, p.batches_expected, p.duplicates_dropped, p.restreamed);

    printf("\n");
    cli_print_members(json);

    json_t *events = json_object_get(root, "events");
    size_t n = json_array_size(events), first = n > 15 ? n - 15 : 0;
    printf("\n%s%s\n", with_events ? "recent events" : "events, as they happen (Ctrl-C to stop)",
           n || !with_events ? "" : ": none");
    for (size_t i = first; i < n && with_events; i++) {
        json_t *e = json_array_get(events, i);
        printf("  %8.1fs  %-8s %s %s\n", json_num(e, "time"), json_str(e, "event", "?"),
               json_str(e, "role", "?"), json_str(e, "id", "?"));
    }
    json_decref(root);
}

/* Prints the events after the last one printed; a coordinator that restarted has a new clock
 * and a fresh list (its first event says so), so a time going back starts over. */
static void print_new_events(const char *json, double *last_time) {
    json_t *root = json_loads(json, 0, NULL);
    json_t *events = json_object_get(root, "events");
    size_t n = json_array_size(events);
    if (n && json_num(json_array_get(events, n - 1), "time") < *last_time) *last_time = -1;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(events, i);
        double t = json_num(e, "time");
        if (t <= *last_time) continue;
        printf("  %8.1fs  %-8s %s %s\n", t, json_str(e, "event", "?"), json_str(e, "role", "?"),
               json_str(e, "id", "?"));
        *last_time = t;
    }
    json_decref(root);
}

/* True (and says how it ended) once the run directory has its summary.json. */
static bool run_finished(const char *run_dir) {
    char path[KD_PATH_MAX + 16];
    snprintf(path, sizeof path, "%s/summary.json", run_dir);
    json_t *summary = json_load_file(path, 0, NULL);
    if (!summary) return false;
    printf("the run is over: %s, test accuracy %.2f%% (%s)\n", json_str(summary, "status", "?"),
           100.0 * json_num(summary, "test_accuracy"), path);
    json_decref(summary);
    return true;
}

/* kdist status --follow: polls once a second until the run ends. While the coordinator is
 * unreachable (it may be restarting) it keeps asking for FOLLOW_PATIENCE seconds. */
#define FOLLOW_PATIENCE 60.0
static int follow(cli_client_t *c, const char *first_json, const char *run_dir) {
    double last_time = -1, last_answer = kd_now();
    print_new_events(first_json, &last_time);
    char last_line[512] = "";
    for (;;) {
        if (kd_node_stop_requested) return 0;
        char *json = NULL, err[KD_ERR_LEN];
        if (cli_client_status(c, STATUS_DEADLINE_MS, &json, err, sizeof err) == 0) {
            last_answer = kd_now();
            print_new_events(json, &last_time);
            cli_progress_t p;
            char line[512];
            if (cli_progress_parse(json, &p, err, sizeof err) == 0) {
                cli_progress_line(&p, line, sizeof line);
                if (strcmp(line, last_line) != 0) printf("  %s\n", line);
                snprintf(last_line, sizeof last_line, "%s", line);
                if (strcmp(p.status, "running") != 0) {
                    printf("the run is %s\n", p.status);
                    free(json);
                    return 0;
                }
            }
            free(json);
        } else if (run_dir && run_finished(run_dir)) {
            return 0;
        } else if (kd_now() - last_answer > FOLLOW_PATIENCE) {
            fprintf(stderr, "kdist status: no answer for %.0f s (%s): the run is over or gone\n",
                    FOLLOW_PATIENCE, err);
            return 1;
        }
        fflush(stdout);
        struct timespec tick = {1, 0}; /* a human's refresh rate, not a wait for an event */
        nanosleep(&tick, NULL);
    }
}

void cli_print_members(const char *json) {
    json_t *root = json_loads(json, 0, NULL);
    json_t *members = json_object_get(root, "members");
    printf("%-8s %-6s %-20s %-8s %-10s %-10s %-8s %s\n", "ROLE", "ID", "HOST", "PID", "STATE",
           "LAST SEEN", "STEPS", "SAMPLES/S");
    size_t i;
    json_t *m;
    json_array_foreach(members, i, m) {
        char seen[32], sps[32], steps[32];
        double ls = json_num(m, "last_seen"), s = json_num(m, "samples_per_sec");
        long st = json_long(m, "steps");
        if (isfinite(ls))
            snprintf(seen, sizeof seen, "%.1fs ago", ls);
        else
            snprintf(seen, sizeof seen, "-");
        if (isfinite(s))
            snprintf(sps, sizeof sps, "%.0f", s);
        else
            snprintf(sps, sizeof sps, "-");
        if (st >= 0)
            snprintf(steps, sizeof steps, "%ld", st);
        else
            snprintf(steps, sizeof steps, "-");
        printf("%-8s %-6s %-20s %-8ld %-10s %-10s %-8s %s\n", json_str(m, "role", "?"),
               json_str(m, "id", "?"), json_str(m, "host", "-"), json_long(m, "pid"),
               json_str(m, "state", "-"), seen, steps, sps);
    }
    if (json_array_size(members) == 0) printf("(no members)\n");
    json_decref(root);
}

int kd_cmd_status(int argc, char **argv) {
    const char *target = NULL, *key = NULL, *server_key = NULL;
    bool raw = false, following = false;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0)
            raw = true;
        else if (strcmp(argv[i], "--key") == 0 && i + 1 < argc)
            key = argv[++i];
        else if (strcmp(argv[i], "--coordinator-key") == 0 && i + 1 < argc)
            server_key = argv[++i];
        else if (strcmp(argv[i], "--follow") == 0 || strcmp(argv[i], "-f") == 0)
            following = true;
        else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            status_usage(stdout);
            return 0;
        } else if (argv[i][0] == '-' || target) {
            fprintf(stderr, "kdist status: unexpected argument '%s'\n", argv[i]);
            status_usage(stderr);
            return 2;
        } else
            target = argv[i];
    }
    char err[KD_ERR_LEN], dir[KD_PATH_MAX], endpoint[KD_PATH_MAX];
    bool is_endpoint = target && strstr(target, "://");
    if (is_endpoint) {
        snprintf(endpoint, sizeof endpoint, "%s", target);
    } else {
        if (target)
            snprintf(dir, sizeof dir, "%s", target);
        else if (newest_run("runs", dir, sizeof dir, err, sizeof err) != 0) {
            fprintf(stderr, "kdist status: %s\n", err);
            return 1;
        }
        if (cli_read_endpoint(dir, endpoint, sizeof endpoint, err, sizeof err) != 0) {
            fprintf(stderr, "kdist status: %s\n", err);
            return 1;
        }
    }
    kd_curve_client_t curve;
    bool curve_on;
    if (cli_curve_credentials(key, server_key, is_endpoint ? NULL : dir, &curve, &curve_on, err,
                              sizeof err) != 0) {
        fprintf(stderr, "kdist status: %s\n", err);
        return 1;
    }

    int rc = 1;
    char *json = NULL;
    cli_client_t *c = cli_client_new(endpoint, curve_on ? &curve : NULL, err, sizeof err);
    if (!c) goto out;
    if (cli_client_status(c, STATUS_DEADLINE_MS, &json, err, sizeof err) != 0) goto out;
    if (raw)
        printf("%s\n", json);
    else
        print_status(endpoint, json, !following);
    rc = following ? follow(c, json, strstr(target ? target : "", "://") ? NULL : dir) : 0;
out:
    if (rc) fprintf(stderr, "kdist status: %s\n", err);
    free(json);
    cli_client_destroy(&c);
    return rc;
}
