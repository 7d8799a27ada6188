/* kdist scale and kdist drain: membership changes of a running run. `scale` asks the run's
 * launcher (kd_run.c) over the control socket that launcher.json names; `drain` asks the
 * coordinator directly. Both then watch the coordinator's membership until the change shows,
 * within a deadline, and print it. */
#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd_cli.h"
#include "kd_curve.h"
#include "kd_util.h"

#define STATUS_DEADLINE_MS 5000  /* one StatusReply */
#define LAUNCHER_REPLY_MS  10000 /* the launcher answers within one turn of its loop */
#define WATCH_EVERY_MS     200
#define DEFAULT_TIMEOUT    60.0 /* seconds for the membership to show the change */
#define IDS_TEXT_MAX       512
#define MAX_WORKERS        1024 /* cluster.workers' bound */

/* ---- shared ------------------------------------------------------------------------------ */

static int check_run_dir(const char *dir, char *err, size_t errlen) {
    struct stat st;
    if (stat(dir, &st) != 0)
        return kd_err(err, errlen, "no such run directory: %s (%s)", dir, strerror(errno));
    if (!S_ISDIR(st.st_mode)) return kd_err(err, errlen, "%s is not a run directory", dir);
    return 0;
}

/* "--key FILE" / "--coordinator-key FILE|Z85": the CurveZMQ credentials of the client
 * (cli_curve_credentials). 1 if not one of them, 0 when taken. */
static int parse_curve_option(int argc, char **argv, int *i, const char **key,
                              const char **server_key) {
    const char *a = argv[*i];
    if (*i + 1 >= argc) return 1;
    if (strcmp(a, "--key") == 0)
        *key = argv[++*i];
    else if (strcmp(a, "--coordinator-key") == 0)
        *server_key = argv[++*i];
    else
        return 1;
    return 0;
}

/* "--timeout S" / "--timeout=S"; consumes argv[*i + 1] in the first form. 1 if not the option,
 * 0 when parsed, -1 (message printed) when malformed. */
static int parse_timeout(const char *cmd, int argc, char **argv, int *i, double *out) {
    const char *a = argv[*i], *v = NULL;
    if (strcmp(a, "--timeout") == 0 && *i + 1 < argc)
        v = argv[++*i];
    else if (strncmp(a, "--timeout=", 10) == 0)
        v = a + 10;
    else
        return 1;
    if (kd_parse_double(v, out) != 0 || !(*out > 0)) {
        fprintf(stderr, "kdist %s: --timeout needs a positive number of seconds, not '%s'\n", cmd,
                v);
        return -1;
    }
    return 0;
}

/* The worker ids in a StatusReply.json, as a JSON array of strings (caller owns it); NULL when
 * the text is not a status object. *status gets the run's status ("running", ...). */
static json_t *worker_ids(const char *json, char *status, size_t statuslen) {
    json_t *root = json_loads(json, 0, NULL);
    if (!json_is_object(root)) {
        json_decref(root);
        return NULL;
    }
    const char *s = json_string_value(json_object_get(root, "status"));
    snprintf(status, statuslen, "%s", s ? s : "?");
    json_t *ids = json_array();
    size_t i;
    json_t *m;
    json_array_foreach(json_object_get(root, "members"), i, m) {
        const char *role = json_string_value(json_object_get(m, "role"));
        const char *id = json_string_value(json_object_get(m, "id"));
        if (role && id && strcmp(role, "worker") == 0) json_array_append_new(ids, json_string(id));
    }
    json_decref(root);
    return ids;
}

static bool has_id(const json_t *ids, const char *id) {
    size_t i;
    json_t *v;
    json_array_foreach(ids, i, v) if (strcmp(json_string_value(v), id) == 0) return true;
    return false;
}

/* "0, 1, 2", or "none" */
static const char *ids_text(const json_t *ids, char *out, size_t n) {
    size_t i, len = 0;
    json_t *v;
    out[0] = 0;
    json_array_foreach(ids, i, v) {
        int w = snprintf(out + len, n - len, "%s%s", i ? ", " : "", json_string_value(v));
        if (w < 0 || (size_t)w >= n - len) break;
        len += (size_t)w;
    }
    if (!json_array_size(ids)) snprintf(out, n, "none");
    return out;
}

/* What a membership watch waits for: every id of `join` live, none of `leave`. */
typedef struct {
    const json_t *join, *leave;
} watch_goal_t;

static bool goal_met(const watch_goal_t *g, const json_t *live) {
    size_t i;
    json_t *v;
    json_array_foreach(g->join, i, v) if (!has_id(live, json_string_value(v))) return false;
    json_array_foreach(g->leave, i, v) if (has_id(live, json_string_value(v))) return false;
    return true;
}

/* Polls the coordinator's StatusReply until the goal shows or the deadline passes. 0 with
 * *json (the last reply, caller frees); -1 with err set (what is still missing). */
static int watch_members(cli_client_t *c, const char *dir, const watch_goal_t *goal, double timeout,
                         char **json, char *err, size_t errlen) {
    double deadline = kd_now() + timeout;
    char status[32], live_text[IDS_TEXT_MAX];
    *json = NULL;
    for (;;) {
        char *reply = NULL;
        if (cli_client_status(c, STATUS_DEADLINE_MS, &reply, err, errlen) != 0) return -1;
        json_t *live = worker_ids(reply, status, sizeof status);
        if (!live) {
            kd_err(err, errlen, "unreadable status from the coordinator: %.200s", reply);
            free(reply);
            return -1;
        }
        bool done = goal_met(goal, live);
        ids_text(live, live_text, sizeof live_text);
        json_decref(live);
        if (done) {
            *json = reply;
            return 0;
        }
        free(reply);
        if (strcmp(status, "running") != 0)
            return kd_err(err, errlen,
                          "the run ended (status '%s') before the change showed; live workers: %s",
                          status, live_text);
        if (kd_now() > deadline) {
            char want_in[IDS_TEXT_MAX], want_out[IDS_TEXT_MAX];
            return kd_err(err, errlen,
                          "after %.0f s the coordinator shows live workers %s; still waiting for "
                          "%s to join and %s to leave (see %s/logs/worker-<id>.log)",
                          timeout, live_text, ids_text(goal->join, want_in, sizeof want_in),
                          ids_text(goal->leave, want_out, sizeof want_out), dir);
        }
        poll(NULL, 0, WATCH_EVERY_MS);
    }
}

/* ---- kdist drain ------------------------------------------------------------------------- */

static void drain_usage(FILE *out) {
    fprintf(out, "usage: kdist drain RUN_DIR WORKER_ID [--timeout SECONDS] [--key FILE]\n"
                 "                   [--coordinator-key FILE|Z85]\n"
                 "  the worker finishes its step, says goodbye and exits 0; waits (60 s by\n"
                 "  default) until it has left the membership. CurveZMQ credentials as for\n"
                 "  `kdist status`\n");
}

int cli_read_control_endpoint(const char *dir, char *out, size_t outlen, char *err, size_t errlen) {
    char path[KD_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/coordinator.control", dir);
    uint8_t *data = NULL;
    size_t len = 0;
    if (kd_read_file(path, &data, &len, err, errlen) != 0) return -1;
    int rc = len > 6 && len < outlen && strncmp((const char *)data, "ipc://", 6) == 0
                 ? 0
                 : kd_err(err, errlen, "%s: expected one ipc:// endpoint", path);
    if (rc == 0) snprintf(out, outlen, "%.*s", (int)len, (const char *)data);
    free(data);
    return rc;
}

int kd_cmd_drain(int argc, char **argv) {
    const char *dir = NULL, *id = NULL, *key = NULL, *server_key = NULL;
    double timeout = DEFAULT_TIMEOUT;
    for (int i = 0; i < argc; i++) {
        int t = parse_timeout("drain", argc, argv, &i, &timeout);
        if (t < 0) return 2;
        if (t == 0 || parse_curve_option(argc, argv, &i, &key, &server_key) == 0) continue;
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            drain_usage(stdout);
            return 0;
        }
        if (argv[i][0] == '-' || (dir && id)) {
            fprintf(stderr, "kdist drain: unexpected argument '%s'\n", argv[i]);
            drain_usage(stderr);
            return 2;
        }
        if (!dir)
            dir = argv[i];
        else
            id = argv[i];
    }
    if (!dir || !id) {
        drain_usage(stderr);
        return 2;
    }

    char err[KD_ERR_LEN], endpoint[KD_PATH_MAX], status[32], live_text[IDS_TEXT_MAX];
    char *json = NULL;
    json_t *live = NULL;
    cli_client_t *c = NULL;
    kd_curve_client_t curve;
    bool curve_on = false;
    int rc = 1;
    if (check_run_dir(dir, err, sizeof err) != 0) goto out;
    if (cli_read_endpoint(dir, endpoint, sizeof endpoint, err, sizeof err) != 0) goto out;
    /* On the coordinator's machine the local control channel; elsewhere an operator key. */
    char why[KD_ERR_LEN];
    if (cli_read_control_endpoint(dir, endpoint, sizeof endpoint, why, sizeof why) == 0) {
        curve_on = false;
    } else if (cli_curve_credentials(key, server_key, dir, &curve, &curve_on, err, sizeof err) !=
               0) {
        goto out;
    }
    if (!(c = cli_client_new(endpoint, curve_on ? &curve : NULL, err, sizeof err))) goto out;
    /* Membership first: the coordinator ignores a DRAIN for an id it does not know. */
    if (cli_client_status(c, STATUS_DEADLINE_MS, &json, err, sizeof err) != 0) goto out;
    if (!(live = worker_ids(json, status, sizeof status))) {
        kd_err(err, sizeof err, "unreadable status from the coordinator at %s", endpoint);
        goto out;
    }
    if (strcmp(status, "running") != 0) {
        kd_err(err, sizeof err, "the run in %s is not running (status '%s')", dir, status);
        goto out;
    }
    if (!has_id(live, id)) {
        kd_err(err, sizeof err, "no live worker '%s' in %s; live workers: %s", id, dir,
               ids_text(live, live_text, sizeof live_text));
        goto out;
    }
    if (cli_client_control(c, KDIST__CONTROL__KIND__DRAIN, id, err, sizeof err) != 0) goto out;
    double t0 = kd_now();
    json_t *leave = json_pack("[s]", id), *none = json_array();
    watch_goal_t goal = {.join = none, .leave = leave};
    free(json);
    int watched = watch_members(c, dir, &goal, timeout, &json, err, sizeof err);
    json_decref(leave);
    json_decref(none);
    if (watched != 0) goto out;
    json_decref(live);
    live = worker_ids(json, status, sizeof status);
    printf("worker %s drained: it finished its step and left after %.1f s; live workers: %s\n", id,
           kd_now() - t0, ids_text(live, live_text, sizeof live_text));
    if (json_array_size(live) == 0)
        printf("no worker is left: the run waits for one (kdist scale %s --workers N)\n", dir);
    rc = 0;
out:
    if (rc) fprintf(stderr, "kdist drain: %s\n", err);
    json_decref(live);
    free(json);
    cli_client_destroy(&c);
    return rc;
}

/* ---- kdist scale ------------------------------------------------------------------------- */

static void scale_usage(FILE *out) {
    fprintf(out, "usage: kdist scale RUN_DIR --workers N [--timeout SECONDS] [--key FILE]\n"
                 "                   [--coordinator-key FILE|Z85]\n"
                 "  changes the number of local workers of a running `kdist run`: new workers\n"
                 "  are started, surplus ones drained; waits (60 s by default) until the\n"
                 "  membership shows the change, then prints it. CurveZMQ credentials as for\n"
                 "  `kdist status`\n");
}

/* launcher.json's launcher pid and control endpoint, checked to be a live launcher. */
static int read_launcher(const char *dir, char *endpoint, size_t n, char *err, size_t errlen) {
    char path[KD_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/launcher.json", dir);
    if (!kd_file_exists(path))
        return kd_err(err, errlen,
                      "%s does not exist: only runs started with `kdist run` can be scaled "
                      "(elsewhere, start `kdist-worker --coordinator ENDPOINT` to add a worker "
                      "and use `kdist drain` to remove one)",
                      path);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!json_is_object(root)) {
        json_decref(root);
        return kd_err(err, errlen, "%s:%d: %s", path, jerr.line, jerr.text);
    }
    json_t *pid = json_object_get(root, "launcher_pid");
    const char *ep = json_string_value(json_object_get(root, "control_endpoint"));
    int rc = 0;
    if (!json_is_integer(pid) || json_integer_value(pid) <= 0)
        rc = kd_err(err, errlen, "%s: no launcher_pid", path);
    else if (kill((pid_t)json_integer_value(pid), 0) != 0 && errno == ESRCH)
        rc = kd_err(err, errlen, "the launcher of %s (pid %lld) is not running: the run has ended",
                    dir, (long long)json_integer_value(pid));
    else if (!ep || !ep[0] || strlen(ep) >= n)
        rc = kd_err(err, errlen,
                    "%s names no control endpoint: the launcher is still starting (try again) "
                    "or predates `kdist scale`",
                    path);
    else
        snprintf(endpoint, n, "%s", ep);
    json_decref(root);
    return rc;
}

/* Control{SCALE, workers} to the launcher's REP socket; *reply is the JSON of its StatusReply
 * (caller owns it). A Refused answer is an error carrying the launcher's reason. */
static int ask_launcher(const char *endpoint, long workers, json_t **reply, char *err,
                        size_t errlen) {
    *reply = NULL;
    void *ctx = zmq_ctx_new(), *req = ctx ? zmq_socket(ctx, ZMQ_REQ) : NULL;
    int rc = -1, zero = 0;
    kd_msg_t msg = {0};
    bool have_msg = false;
    if (!req) {
        kd_err(err, errlen, "cannot create a ZeroMQ socket: %s", zmq_strerror(errno));
        goto out;
    }
    zmq_setsockopt(req, ZMQ_LINGER, &zero, sizeof zero);
    kd_env_t env = KDIST__ENVELOPE__INIT;
    Kdist__Control ctl = KDIST__CONTROL__INIT;
    ctl.kind = KDIST__CONTROL__KIND__SCALE;
    ctl.workers = (uint32_t)workers;
    env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
    env.control = &ctl;
    if (zmq_connect(req, endpoint) != 0 || kd_wire_send(req, NULL, 0, &env, NULL, 0, 0) != 0) {
        kd_err(err, errlen, "cannot reach the launcher at %s: %s", endpoint, zmq_strerror(errno));
        goto out;
    }
    double deadline = kd_now() + LAUNCHER_REPLY_MS / 1000.0;
    zmq_pollitem_t item = {req, 0, ZMQ_POLLIN, 0};
    while (!(item.revents & ZMQ_POLLIN)) {
        int left = (int)((deadline - kd_now()) * 1000.0);
        if (left <= 0) {
            kd_err(err, errlen, "the launcher did not answer on %s within %.0f s", endpoint,
                   LAUNCHER_REPLY_MS / 1000.0);
            goto out;
        }
        if (zmq_poll(&item, 1, left) < 0 && errno != EINTR) {
            kd_err(err, errlen, "polling %s: %s", endpoint, zmq_strerror(errno));
            goto out;
        }
    }
    char werr[KD_ERR_LEN];
    if (kd_wire_recv(req, false, 0, &msg, werr, sizeof werr) != KD_WIRE_OK) {
        kd_err(err, errlen, "the launcher at %s sent an unreadable answer: %s", endpoint, werr);
        goto out;
    }
    have_msg = true;
    if (msg.env->body_case == KDIST__ENVELOPE__BODY_REFUSED) {
        const char *why = msg.env->refused->reason;
        kd_err(err, errlen, "the launcher refused: %s", why && why[0] ? why : "(no reason)");
        goto out;
    }
    if (msg.env->body_case == KDIST__ENVELOPE__BODY_STATUS && msg.env->status->json)
        *reply = json_loads(msg.env->status->json, 0, NULL);
    if (!json_is_object(*reply)) {
        json_decref(*reply);
        *reply = NULL;
        kd_err(err, errlen, "the launcher at %s sent an unexpected answer", endpoint);
        goto out;
    }
    rc = 0;
out:
    if (have_msg) kd_msg_close(&msg);
    if (req) zmq_close(req);
    if (ctx) zmq_ctx_term(ctx);
    return rc;
}

static int parse_scale_args(int argc, char **argv, const char **dir, long *workers, double *timeout,
                            const char **key, const char **server_key) {
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
        int t = parse_timeout("scale", argc, argv, &i, timeout);
        if (t < 0) return -1;
        if (t == 0 || parse_curve_option(argc, argv, &i, key, server_key) == 0) continue;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            scale_usage(stdout);
            exit(0);
        }
        if (strcmp(a, "--workers") == 0 && i + 1 < argc)
            v = argv[++i];
        else if (strncmp(a, "--workers=", 10) == 0)
            v = a + 10;
        if (v) {
            if (kd_parse_long(v, workers) != 0 || *workers < 1 || *workers > MAX_WORKERS) {
                fprintf(stderr,
                        "kdist scale: --workers needs a count of at least 1 and at most %d, "
                        "not '%s'\n",
                        MAX_WORKERS, v);
                return -1;
            }
        } else if (a[0] == '-' || *dir) {
            fprintf(stderr, "kdist scale: unexpected argument '%s'\n", a);
            return -1;
        } else {
            *dir = a;
        }
    }
    if (!*dir || *workers < 1) {
        fprintf(stderr, "kdist scale: %s\n", *dir ? "--workers N is required" : "no RUN_DIR");
        return -1;
    }
    return 0;
}

int kd_cmd_scale(int argc, char **argv) {
    const char *dir = NULL, *key = NULL, *server_key = NULL;
    long workers = 0;
    double timeout = DEFAULT_TIMEOUT;
    if (parse_scale_args(argc, argv, &dir, &workers, &timeout, &key, &server_key) != 0) {
        scale_usage(stderr);
        return 2;
    }
    char err[KD_ERR_LEN], control[KD_PATH_MAX + 16], endpoint[KD_PATH_MAX];
    char started[IDS_TEXT_MAX], draining[IDS_TEXT_MAX], live_text[IDS_TEXT_MAX], status[32];
    json_t *reply = NULL, *live = NULL;
    char *json = NULL;
    cli_client_t *c = NULL;
    kd_curve_client_t curve;
    bool curve_on = false;
    int rc = 1;
    if (check_run_dir(dir, err, sizeof err) != 0) goto out;
    if (cli_read_endpoint(dir, endpoint, sizeof endpoint, err, sizeof err) != 0) goto out;
    if (cli_curve_credentials(key, server_key, dir, &curve, &curve_on, err, sizeof err) != 0)
        goto out;
    if (read_launcher(dir, control, sizeof control, err, sizeof err) != 0) goto out;
    if (ask_launcher(control, workers, &reply, err, sizeof err) != 0) goto out;
    long before = (long)json_integer_value(json_object_get(reply, "before"));
    watch_goal_t goal = {.join = json_object_get(reply, "ids"),
                         .leave = json_object_get(reply, "draining")};
    if (!json_is_array(goal.join) || !json_is_array(goal.leave)) {
        kd_err(err, sizeof err, "the launcher's answer lacks the worker ids");
        goto out;
    }
    printf("scaling %s from %ld to %ld worker%s (started: %s; draining: %s)\n", dir, before,
           workers, workers == 1 ? "" : "s",
           ids_text(json_object_get(reply, "started"), started, sizeof started),
           ids_text(goal.leave, draining, sizeof draining));
    fflush(stdout);
    if (!(c = cli_client_new(endpoint, curve_on ? &curve : NULL, err, sizeof err))) goto out;
    if (watch_members(c, dir, &goal, timeout, &json, err, sizeof err) != 0) goto out;
    live = worker_ids(json, status, sizeof status);
    printf("%zu live worker%s: %s\n\n", json_array_size(live),
           json_array_size(live) == 1 ? "" : "s", ids_text(live, live_text, sizeof live_text));
    cli_print_members(json);
    rc = 0;
out:
    if (rc) fprintf(stderr, "kdist scale: %s\n", err);
    json_decref(reply);
    json_decref(live);
    free(json);
    cli_client_destroy(&c);
    return rc;
}
