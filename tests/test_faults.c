/* test_faults: what kdist survives (DESIGN §9), with real processes on loopback. Each case
 * starts the coordinator, teacher nodes and workers from their binaries, waits for a moment of
 * the run seen in the coordinator's status (never a fixed sleep), SIGKILLs a process, and
 * requires the run to end "completed" with every batch of every epoch applied exactly once and
 * a normal accuracy:
 *   a) a worker killed mid-epoch, not replaced (sync, async, ssp): the others finish;
 *   b) a worker added mid-run trains (sync, ssp);
 *   c) a teacher node killed mid-epoch: its share goes to the live one (sync, async); a teacher
 *      killed and restarted under its id gets its share back (sync);
 *   d) the coordinator killed and restarted with --resume (sync, async): workers and teachers
 *      come back by themselves; a torn newest checkpoint (and a scribbled-over one before it)
 *      are skipped for the newest valid one;
 *   f) random faults: KD_FAULT_RUNS runs (default 10), each killing random roles at random
 *      moments and restarting them; KD_FAULT_SEED repeats a sequence of faults. */
#include <dirent.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <sys/stat.h>

#include "kd_safetensors.h"
#include "kd_test.h"
#include "kd_test_cluster.h"
#include "kd_util.h"
#include "kd_wire.h"

#define N_TRAIN      55000 /* the 60000 training images less data.val_size (5000) */
#define BATCH        128
#define N_BATCHES    ((N_TRAIN + BATCH - 1) / BATCH) /* 430 per epoch */
#define EPOCHS       3
#define TOTAL        (EPOCHS * N_BATCHES)
#define MIN_ACCURACY 0.75 /* 3 epochs of this MLP: 0.81-0.86 without faults; chance 0.10 */
#define MAX_WORKERS  4
#define MAX_TEACHERS 2
#define MAX_OVR      8
#define MAX_ARGS     40
#define RUN_SECONDS  60.0 /* a run's whole deadline; a healthy one takes under 10 s */
#define BACK_SECONDS 30.0 /* deadline for the cluster to be whole again after a fault */
#define DEAD_SECONDS 15.0 /* deadline for a run to finish after a teacher's death (c) */
#define STATUS_WAIT  1.0  /* seconds a status request may take */
#define CKPT_EVERY   "checkpoint.every_steps=40"

/* A fast run: a 784-64-10 MLP; 430 batches an epoch take ~0.5 s, so epochs are long enough to
 * strike in the middle of one and the whole run lasts seconds. Liveness deadlines are short so
 * a death is noticed in 1.5 s. lr 0.02: at 0.05 async and ssp with 3 workers sometimes diverge
 * (0.3 accuracy) without any fault, which would hide what the faults do. */
static const char *recipe_text = "name: faults\n"
                                 "seed: 5\n"
                                 "data:\n"
                                 "  val_size: 5000\n"
                                 "  test_subset: 1000\n"
                                 "student:\n"
                                 "  layers:\n"
                                 "    - {type: flatten}\n"
                                 "    - {type: linear, out_features: 64}\n"
                                 "    - {type: relu}\n"
                                 "    - {type: linear, out_features: 10}\n"
                                 "distill:\n"
                                 "  alpha: 0.0\n"
                                 "optim:\n"
                                 "  name: sgd\n"
                                 "  lr: 0.02\n"
                                 "  momentum: 0.9\n"
                                 "schedule:\n"
                                 "  name: constant\n"
                                 "train:\n"
                                 "  epochs: 3\n"
                                 "  batch_size: 128\n"
                                 "  threads: 1\n"
                                 "checkpoint:\n"
                                 "  keep: 3\n"
                                 "cluster:\n"
                                 "  heartbeat_ms: 100\n"
                                 "  heartbeat_timeout_ms: 1500\n";

static const char *tmp;
static char recipe[KD_PATH_MAX + 32];

/* ---- processes --------------------------------------------------------------------------- */

typedef struct {
    pid_t pid; /* 0 once reaped */
    int rc;    /* exit code once reaped (128+signal) */
    char log[KD_PATH_MAX + 64];
    long log_start; /* the log's size when this incarnation started */
    bool used;
} proc_t;

typedef struct {
    char name[64], dir[KD_PATH_MAX], endpoint[256], name_arg[96], bind_arg[300];
    const char *overrides[MAX_OVR];
    int n_overrides;
    proc_t coord, workers[MAX_WORKERS], teachers[MAX_TEACHERS];
    void *zctx, *status_sock;
} cluster_t;

static long file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : 0;
}

static void proc_start(proc_t *p, char *const argv[]) {
    p->used = true;
    p->log_start = file_size(p->log);
    p->rc = -1;
    p->pid = kd_test_spawn(argv, p->log);
    CHECK(p->pid > 0);
    if (p->pid < 0) p->pid = 0;
}

/* True while the process runs; reaps it (keeping its exit code) once it has ended. */
static bool proc_running(proc_t *p) {
    if (p->pid <= 0) return false;
    int st;
    pid_t r = waitpid(p->pid, &st, WNOHANG);
    if (r == 0) return true;
    p->rc = r == p->pid ? (WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st)) : -1;
    p->pid = 0;
    return false;
}

static void proc_kill(proc_t *p) {
    if (!proc_running(p)) return;
    kill(p->pid, SIGKILL);
    p->rc = kd_test_wait(p->pid, 10);
    p->pid = 0;
}

/* This incarnation's part of its log (caller frees). */
static char *proc_log_tail(const proc_t *p) {
    uint8_t *text = NULL;
    size_t len = 0;
    char err[KD_ERR_LEN];
    if (kd_read_file(p->log, &text, &len, err, sizeof err) != 0) return kd_xstrdup("");
    long start = p->log_start <= (long)len ? p->log_start : 0;
    char *tail = kd_xstrdup((char *)text + start);
    free(text);
    return tail;
}

static bool log_has(const char *path, const char *needle) {
    uint8_t *text = NULL;
    size_t len = 0;
    char err[KD_ERR_LEN];
    if (kd_read_file(path, &text, &len, err, sizeof err) != 0) return false;
    bool found = strstr((char *)text, needle) != NULL;
    free(text);
    return found;
}

/* Prints the lines of a log that contain needle (at most max of them, the last ones). */
static void show_lines(const char *path, const char *needle, int max) {
    uint8_t *text = NULL;
    size_t len = 0;
    char err[KD_ERR_LEN];
    if (kd_read_file(path, &text, &len, err, sizeof err) != 0) return;
    int total = 0;
    for (char *p = (char *)text; (p = strstr(p, needle)); p++) total++;
    fprintf(stderr, "--- %s: %d line(s) with %s%s\n", path, total, needle,
            total > max ? ", the last ones:" : "");
    int seen = 0;
    for (char *line = (char *)text; line && *line;) {
        char *end = strchr(line, '\n');
        if (end) *end = 0;
        if (strstr(line, needle) && ++seen > total - max) fprintf(stderr, "    %s\n", line);
        line = end ? end + 1 : NULL;
    }
    free(text);
}

/* Whether one line of the log holds both strings. */
static bool log_line_has(const char *path, const char *a, const char *b) {
    uint8_t *text = NULL;
    size_t len = 0;
    char err[KD_ERR_LEN];
    if (kd_read_file(path, &text, &len, err, sizeof err) != 0) return false;
    bool found = false;
    for (char *line = (char *)text; line && *line && !found;) {
        char *end = strchr(line, '\n');
        if (end) *end = 0;
        found = strstr(line, a) && strstr(line, b);
        line = end ? end + 1 : NULL;
    }
    free(text);
    return found;
}

/* ---- the cluster ------------------------------------------------------------------------- */

static int add_args(const cluster_t *c, char **argv, int argc) {
    return kd_test_add_overrides(argv, argc, c->name_arg, c->overrides, c->n_overrides);
}

/* Starts (or restarts, with --resume, on the same endpoint) the coordinator and waits until it
 * listens: it writes coordinator.endpoint once bound. */
static bool start_coordinator(cluster_t *c, bool resume) {
    char endpoint_file[KD_PATH_MAX + 32];
    snprintf(endpoint_file, sizeof endpoint_file, "%s/coordinator.endpoint", c->dir);
    unlink(endpoint_file);
    char *argv[MAX_ARGS];
    int argc = kd_test_coordinator_argv(argv, recipe, c->dir);
    if (resume) argv[argc++] = "--resume";
    argc = add_args(c, argv, argc);
    /* Nodes reconnect to the endpoint they know, so a restart binds the same one. */
    if (c->endpoint[0]) {
        snprintf(c->bind_arg, sizeof c->bind_arg, "cluster.bind=%s", c->endpoint);
        argv[argc++] = c->bind_arg;
        argv[argc] = NULL;
    }
    proc_start(&c->coord, argv);
    double deadline = kd_test_now() + 30.0;
    while (access(endpoint_file, F_OK) != 0 && kd_test_now() < deadline && proc_running(&c->coord))
        nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    char endpoint[256] = "";
    bool up = kd_test_read_text(endpoint_file, endpoint, sizeof endpoint) && endpoint[0];
    CHECK(up);
    if (!up) {
        fprintf(stderr, "%s: the coordinator did not come up\n", c->name);
        kd_test_show_log(c->coord.log);
        return false;
    }
    if (!c->endpoint[0]) snprintf(c->endpoint, sizeof c->endpoint, "%s", endpoint);
    CHECK(strcmp(endpoint, c->endpoint) == 0);
    return true;
}

static void start_teacher(cluster_t *c, int t) {
    char id[16];
    snprintf(id, sizeof id, "%d", t);
    char *argv[MAX_ARGS];
    int argc = kd_test_teacher_argv(argv, c->endpoint, id, recipe);
    add_args(c, argv, argc);
    proc_start(&c->teachers[t], argv);
}

/* A worker under id w; with_id false starts it as a user scaling up would, with the endpoint
 * alone (its id is then host-pid). */
static void start_worker_as(cluster_t *c, int w, bool with_id) {
    char id[16];
    snprintf(id, sizeof id, "%d", w);
    char *argv[] = {
        (char *)kd_test_bin("kdist-worker"), "--coordinator", c->endpoint, "--id", id, NULL};
    if (!with_id) argv[3] = NULL;
    proc_start(&c->workers[w], argv);
}

static void start_worker(cluster_t *c, int w) {
    start_worker_as(c, w, true);
}

static void set_log(proc_t *p, const cluster_t *c, const char *role, int id) {
    snprintf(p->log, sizeof p->log, "%s/logs/%s-%d.log", c->dir, role, id);
}

/* A fresh run directory and the whole cluster started. overrides: NULL-terminated. */
static bool cluster_start(cluster_t *c, const char *name, int workers, int teachers,
                          const char *const *overrides) {
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", name);
    snprintf(c->dir, sizeof c->dir, "%s/%s", tmp, name);
    snprintf(c->name_arg, sizeof c->name_arg, "name=%s", name);
    c->n_overrides = kd_test_take_overrides(c->overrides, MAX_OVR, overrides);
    char logs[KD_PATH_MAX + 16];
    snprintf(logs, sizeof logs, "%s/logs", c->dir);
    if (!kd_test_make_dirs(logs)) {
        CHECK(false);
        return false;
    }
    set_log(&c->coord, c, "coordinator", 0);
    for (int t = 0; t < MAX_TEACHERS; t++) set_log(&c->teachers[t], c, "teacher", t);
    for (int w = 0; w < MAX_WORKERS; w++) set_log(&c->workers[w], c, "worker", w);
    c->zctx = zmq_ctx_new();
    if (!start_coordinator(c, false)) return false;
    for (int t = 0; t < teachers; t++) start_teacher(c, t);
    for (int w = 0; w < workers; w++) start_worker(c, w);
    return true;
}

/* Nothing of the case outlives it. */
static void cluster_destroy(cluster_t *c) {
    proc_kill(&c->coord);
    for (int t = 0; t < MAX_TEACHERS; t++) proc_kill(&c->teachers[t]);
    for (int w = 0; w < MAX_WORKERS; w++) proc_kill(&c->workers[w]);
    if (c->status_sock) zmq_close(c->status_sock);
    c->status_sock = NULL;
    if (c->zctx) zmq_ctx_term(c->zctx);
    c->zctx = NULL;
}

/* ---- the coordinator's status ------------------------------------------------------------ */

static void status_send(void *sock, kd_env_t *env) {
    kd_wire_send(sock, NULL, 0, env, NULL, 0, ZMQ_DONTWAIT);
}

static void status_send_control(void *sock) {
    Kdist__Control ctl = KDIST__CONTROL__INIT;
    ctl.kind = KDIST__CONTROL__KIND__STATUS;
    ctl.target = "";
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_CONTROL;
    env.control = &ctl;
    status_send(sock, &env);
}

/* For a coordinator that wants clients to introduce themselves first (as `kdist status`). */
static void status_send_hello(void *sock) {
    Kdist__Hello hello = KDIST__HELLO__INIT;
    hello.role = KDIST__ROLE__CLIENT;
    hello.node_id = "test_faults";
    hello.incarnation = kd_wire_new_incarnation();
    hello.host = "localhost";
    hello.pid = (uint32_t)getpid();
    kd_env_t env = KDIST__ENVELOPE__INIT;
    env.body_case = KDIST__ENVELOPE__BODY_HELLO;
    env.hello = &hello;
    status_send(sock, &env);
}

/* The coordinator's StatusReply as JSON (caller decrefs), or NULL when it does not answer in
 * STATUS_WAIT. A socket that missed an answer is replaced, so no stale reply is read later. */
static json_t *status_get(cluster_t *c) {
    char err[KD_ERR_LEN];
    if (!c->status_sock) {
        char identity[128];
        kd_wire_identity(identity, sizeof identity, "client", "test_faults",
                         kd_wire_new_incarnation());
        c->status_sock = kd_socket_dealer(c->zctx, identity, c->endpoint, 0, err, sizeof err);
        if (!c->status_sock) return NULL;
    }
    status_send_control(c->status_sock);
    bool said_hello = false;
    double deadline = kd_test_now() + STATUS_WAIT;
    while (kd_test_now() < deadline) {
        zmq_pollitem_t item = {c->status_sock, 0, ZMQ_POLLIN, 0};
        zmq_poll(&item, 1, 50);
        kd_msg_t msg;
        if (kd_wire_recv(c->status_sock, false, ZMQ_DONTWAIT, &msg, err, sizeof err) != KD_WIRE_OK)
            continue;
        json_t *j = NULL;
        kd_env_t *env = msg.env;
        if (env->body_case == KDIST__ENVELOPE__BODY_STATUS && env->status && env->status->json) {
            j = json_loads(env->status->json, 0, NULL);
        } else if (env->body_case == KDIST__ENVELOPE__BODY_REFUSED && !said_hello &&
                   env->refused->reason && strstr(env->refused->reason, "hello")) {
            status_send_hello(c->status_sock);
            status_send_control(c->status_sock);
            said_hello = true;
        }
        kd_msg_close(&msg);
        if (j) return j;
    }
    zmq_close(c->status_sock);
    c->status_sock = NULL;
    return NULL;
}

static long jint(json_t *j, const char *key) {
    return (long)json_integer_value(json_object_get(j, key));
}

/* Batches applied in the status's current epoch. */
static long applied_in_epoch(json_t *s) {
    return jint(s, "batches_applied") - (jint(s, "batches_expected") - N_BATCHES);
}

static int count_members(json_t *s, const char *role) {
    int n = 0;
    size_t i;
    json_t *m;
    json_array_foreach(json_object_get(s, "members"), i, m) {
        const char *r = json_string_value(json_object_get(m, "role"));
        if (r && strcmp(r, role) == 0) n++;
    }
    return n;
}

/* The member that is process pid: its steps, or -1 when it is not a member. */
static long member_steps(json_t *s, pid_t pid) {
    size_t i;
    json_t *m;
    json_array_foreach(json_object_get(s, "members"), i, m) {
        if (jint(m, "pid") == (long)pid) return jint(m, "steps");
    }
    return -1;
}

static void print_status(const char *what, json_t *s) {
    if (!s) {
        fprintf(stderr, "%s: no status\n", what);
        return;
    }
    fprintf(stderr,
            "%s: %s, epoch %ld, %ld/%ld batches applied (%ld this epoch), %ld duplicates, %ld "
            "restreamed, %ld stale, %d worker(s), %d teacher(s)\n",
            what, json_string_value(json_object_get(s, "status")), jint(s, "epoch"),
            jint(s, "batches_applied"), jint(s, "batches_expected"), applied_in_epoch(s),
            jint(s, "duplicates_dropped"), jint(s, "restreamed"), jint(s, "stale_dropped"),
            count_members(s, "worker"), count_members(s, "teacher"));
}

/* A moment of the run, seen in the status: every condition holds and the run is running. */
typedef struct {
    long epoch, in_epoch;  /* at least this far into this epoch (epoch -1: any epoch) */
    long applied;          /* at least this many batches applied in all */
    int workers, teachers; /* at least these members */
    int checkpoints;       /* at least this many periodic checkpoint files */
    pid_t pusher;          /* this worker process has pushed at least once */
} moment_t;

static int count_checkpoints(const cluster_t *c, char names[][300], int max);

static bool moment_reached(const cluster_t *c, json_t *s, const moment_t *m) {
    const char *status = json_string_value(json_object_get(s, "status"));
    if (!status || strcmp(status, "running") != 0) return false;
    if (m->epoch >= 0 && (jint(s, "epoch") != m->epoch || applied_in_epoch(s) < m->in_epoch))
        return false;
    if (jint(s, "batches_applied") < m->applied) return false;
    if (count_members(s, "worker") < m->workers || count_members(s, "teacher") < m->teachers)
        return false;
    if (m->pusher > 0 && member_steps(s, m->pusher) < 1) return false;
    return m->checkpoints == 0 || count_checkpoints(c, NULL, 0) >= m->checkpoints;
}

/* Polls the status until the moment comes. Returns its status (caller decrefs), or NULL when
 * the coordinator ended first or the deadline passed (then *timed_out says which). */
static json_t *wait_moment(cluster_t *c, const moment_t *m, double seconds, bool *timed_out) {
    double deadline = kd_test_now() + seconds;
    *timed_out = false;
    while (proc_running(&c->coord)) {
        json_t *s = status_get(c);
        if (s && moment_reached(c, s, m)) return s;
        if (kd_test_now() > deadline) {
            print_status("deadline passed waiting for a moment of the run", s);
            json_decref(s);
            *timed_out = true;
            return NULL;
        }
        json_decref(s);
        nanosleep(&(struct timespec){0, 10 * 1000 * 1000}, NULL);
    }
    return NULL;
}

/* ---- the end of a run -------------------------------------------------------------------- */

/* A node started so late that the coordinator had already gone never joined; it would try to
 * reconnect forever (as it should). Only the random test makes these; they are not failures. */
static bool never_joined(const proc_t *p) {
    char *tail = proc_log_tail(p);
    bool joined = strstr(tail, "-WELCOME") || strstr(tail, "-REFUSED");
    free(tail);
    return !joined;
}

/* Waits for the coordinator (deadline: seconds) and then every node; returns summary.json
 * (caller decrefs) or NULL. A coordinator past its deadline is asked to stop (SIGTERM), so its
 * summary still shows how far the run got. */
static json_t *cluster_finish(cluster_t *c, double seconds) {
    double deadline = kd_test_now() + seconds;
    while (proc_running(&c->coord) && kd_test_now() < deadline)
        nanosleep(&(struct timespec){0, 20 * 1000 * 1000}, NULL);
    if (proc_running(&c->coord)) {
        json_t *s = status_get(c);
        fprintf(stderr, "%s: the run did not end within %.0f s\n", c->name, seconds);
        print_status(c->name, s);
        json_decref(s);
        kill(c->coord.pid, SIGTERM);
        c->coord.rc = kd_test_wait(c->coord.pid, 20);
        c->coord.pid = 0;
        CHECK(false);
    }
    CHECK(c->coord.rc == 0);
    if (c->coord.rc != 0) kd_test_show_log(c->coord.log);
    proc_t *nodes[MAX_WORKERS + MAX_TEACHERS];
    int n = 0;
    for (int t = 0; t < MAX_TEACHERS; t++) nodes[n++] = &c->teachers[t];
    for (int w = 0; w < MAX_WORKERS; w++) nodes[n++] = &c->workers[w];
    for (int i = 0; i < n; i++) {
        proc_t *p = nodes[i];
        if (!p->used || p->pid <= 0) continue;
        double node_deadline = kd_test_now() + 15.0;
        while (proc_running(p) && kd_test_now() < node_deadline)
            nanosleep(&(struct timespec){0, 20 * 1000 * 1000}, NULL);
        if (proc_running(p) && never_joined(p)) {
            fprintf(stderr, "%s: %s was started after the run ended; stopping it\n", c->name,
                    p->log);
            proc_kill(p);
            continue;
        }
        proc_kill(p); /* (only if still running) */
        CHECK(p->rc == 0);
        if (p->rc != 0) {
            fprintf(stderr, "%s: %s exited with %d\n", c->name, p->log, p->rc);
            kd_test_show_log(p->log);
        }
    }
    char path[KD_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/summary.json", c->dir);
    json_t *summary = json_load_file(path, 0, NULL);
    CHECK(summary != NULL);
    return summary;
}

static long ledger(json_t *summary, const char *key) {
    return jint(json_object_get(summary, "ledger"), key);
}

static int is_ckpt(const struct dirent *e) {
    const char *suffix = ".safetensors"; /* not its .blake2b digest */
    size_t n = strlen(e->d_name), k = strlen(suffix);
    return strncmp(e->d_name, "ckpt-", 5) == 0 && n > k && strcmp(e->d_name + n - k, suffix) == 0 &&
           !strstr(e->d_name, ".tmp.");
}

/* The periodic checkpoints, oldest first (names, when asked for, up to max). */
static int count_checkpoints(const cluster_t *c, char names[][300], int max) {
    char dir[KD_PATH_MAX + 32];
    snprintf(dir, sizeof dir, "%s/checkpoints", c->dir);
    struct dirent **list;
    int n = scandir(dir, &list, is_ckpt, alphasort);
    if (n < 0) return 0;
    for (int i = 0; i < n; i++) {
        if (names && i < max) snprintf(names[i], 300, "%s", list[i]->d_name);
        free(list[i]);
    }
    free(list);
    return n;
}

/* The last checkpoint (written at the end) holds the last epoch's ledger: every batch set. */
static void check_final_checkpoint(const cluster_t *c) {
    char names[64][300];
    int n = count_checkpoints(c, names, 64);
    CHECK(n > 0 && n <= 64);
    if (n <= 0 || n > 64) return;
    char path[KD_PATH_MAX + 350], err[KD_ERR_LEN];
    snprintf(path, sizeof path, "%s/checkpoints/%s", c->dir, names[n - 1]);
    kd_safetensors_t *st = NULL;
    CHECK(kd_st_open(path, &st, err, sizeof err) == 0);
    if (!st) return;
    const kd_st_tensor_t *t = kd_st_find(st, "ledger.applied");
    CHECK(t && t->nbytes == N_BATCHES);
    long set = 0;
    if (t && t->nbytes == N_BATCHES) {
        const uint8_t *applied = kd_st_data(st, t);
        for (size_t b = 0; b < t->nbytes; b++) set += applied[b] == 1;
    }
    CHECK(set == N_BATCHES);
    if (set != N_BATCHES)
        fprintf(stderr, "%s: %ld/%d batches set in its ledger\n", path, set, N_BATCHES);
    kd_st_close(&st);
}

/* The coordinator logs each epoch's end with its ledger; every epoch must end whole (after a
 * restart an epoch may end twice: its last incarnation counts as well). */
static void check_epochs_in_log(const cluster_t *c) {
    uint8_t *text = NULL;
    size_t len = 0;
    char err[KD_ERR_LEN];
    CHECK(kd_read_file(c->coord.log, &text, &len, err, sizeof err) == 0);
    bool whole[EPOCHS] = {false};
    for (const char *p = text ? (char *)text : ""; (p = strstr(p, "COORD-EPOCH-DONE")); p++) {
        unsigned epoch;
        size_t applied, n;
        if (sscanf(p, "COORD-EPOCH-DONE epoch %u complete: %zu/%zu", &epoch, &applied, &n) == 3 &&
            epoch < EPOCHS)
            whole[epoch] = whole[epoch] || (applied == n && n == N_BATCHES);
    }
    free(text);
    for (int e = 0; e < EPOCHS; e++) {
        CHECK(whole[e]);
        if (!whole[e]) fprintf(stderr, "%s: epoch %d never ended whole\n", c->name, e);
    }
}

/* The verdict on a run: completed, every batch of every epoch applied once, a normal
 * accuracy. Returns whether all of it held. */
static bool check_completed(const cluster_t *c, json_t *summary) {
    int failures = kd_test_failures;
    if (!summary) return false;
    const char *status = json_string_value(json_object_get(summary, "status"));
    double acc = json_number_value(json_object_get(summary, "test_accuracy"));
    fprintf(stderr,
            "%s: %s, test accuracy %.4f, ledger %ld/%ld applied, %ld duplicates dropped, %ld "
            "restreamed, %ld stale, %ld steps, %.1f s\n",
            c->name, status ? status : "?", acc, ledger(summary, "batches_applied"),
            ledger(summary, "batches_expected"), ledger(summary, "duplicates_dropped"),
            ledger(summary, "restreamed"), ledger(summary, "stale_dropped"), jint(summary, "steps"),
            json_number_value(json_object_get(summary, "wall_seconds")));
    CHECK(status && strcmp(status, "completed") == 0);
    CHECK(ledger(summary, "batches_expected") == TOTAL);
    CHECK(ledger(summary, "batches_applied") == ledger(summary, "batches_expected"));
    CHECK(jint(summary, "epochs") == EPOCHS);
    CHECK(acc >= MIN_ACCURACY);
    check_epochs_in_log(c);
    check_final_checkpoint(c);
    return kd_test_failures == failures;
}

/* ---- a) a worker killed mid-epoch -------------------------------------------------------- */

/* accumulate > 1: the worker dies holding gradients it summed but never pushed; their batches
 * are streamed again, the ones a push named are counted once. overlap: chunked pushes over TCP
 * (cluster.overlap), assembled while both live, applied chunk by chunk once one is left. */
static void test_worker_killed(const char *consistency, int accumulate, bool overlap) {
    char name[64], mode[64], acc[64];
    snprintf(name, sizeof name, "worker_killed_%s_acc%d%s", consistency, accumulate,
             overlap ? "_overlap" : "");
    snprintf(mode, sizeof mode, "cluster.consistency=%s", consistency);
    snprintf(acc, sizeof acc, "cluster.accumulate=%d", accumulate);
    const char *overrides[] = {mode,
                               acc,
                               "cluster.staleness=1",
                               "cluster.restream_timeout_ms=1500",
                               overlap ? "cluster.overlap=true" : "cluster.overlap=false",
                               overlap ? "cluster.shared_memory=false"
                                       : "cluster.shared_memory=true",
                               NULL};
    cluster_t c;
    double t0 = kd_test_now();
    if (cluster_start(&c, name, 2, 1, overrides)) {
        bool timed_out;
        moment_t mid = {.epoch = 1, .in_epoch = N_BATCHES / 4, .workers = 2, .teachers = 1};
        json_t *s = wait_moment(&c, &mid, RUN_SECONDS, &timed_out);
        CHECK(s != NULL);
        if (s) {
            proc_kill(&c.workers[1]);
            print_status("worker 1 killed at", s);
            json_decref(s);
        }
        json_t *summary = cluster_finish(&c, RUN_SECONDS);
        check_completed(&c, summary);
        /* the coordinator saw it die (no goodbye) and went on without it */
        CHECK(log_has(c.coord.log, "worker 1 silent for"));
        CHECK(json_integer_value(json_object_get(summary, "workers_max")) == 2);
        json_t *streamed = json_object_get(json_object_get(summary, "ledger"), "pushes_streamed");
        CHECK(overlap ? json_integer_value(streamed) > 0 : json_integer_value(streamed) == 0);
        json_decref(summary);
    }
    cluster_destroy(&c);
    fprintf(stderr, "%s: %.1f s\n", name, kd_test_now() - t0);
}

/* ---- b) a worker added mid-run ----------------------------------------------------------- */

static void test_worker_added(const char *consistency) {
    char name[64], mode[64];
    snprintf(name, sizeof name, "worker_added_%s", consistency);
    snprintf(mode, sizeof mode, "cluster.consistency=%s", consistency);
    const char *overrides[] = {mode, "cluster.staleness=1", "cluster.restream_timeout_ms=1500",
                               NULL};
    cluster_t c;
    double t0 = kd_test_now();
    if (cluster_start(&c, name, 2, 1, overrides)) {
        bool timed_out;
        moment_t mid = {.epoch = 0, .in_epoch = N_BATCHES / 4, .workers = 2, .teachers = 1};
        json_t *s = wait_moment(&c, &mid, RUN_SECONDS, &timed_out);
        CHECK(s != NULL);
        if (s) {
            start_worker_as(&c, 2, false);
            print_status("a third worker started at", s);
            json_decref(s);
            /* It pushes gradients while the run goes on (the run may end first on a fast
             * machine: then its log below still has to show its steps). */
            moment_t pushed = {.epoch = -1, .pusher = c.workers[2].pid};
            s = wait_moment(&c, &pushed, RUN_SECONDS, &timed_out);
            CHECK(!timed_out);
            if (s)
                fprintf(stderr, "the third worker pushed: %ld step(s) so far, in epoch %ld\n",
                        member_steps(s, c.workers[2].pid), jint(s, "epoch"));
            json_decref(s);
        }
        json_t *summary = cluster_finish(&c, RUN_SECONDS);
        check_completed(&c, summary);
        CHECK(json_integer_value(json_object_get(summary, "workers_max")) == 3);
        json_decref(summary);
        char *tail = proc_log_tail(&c.workers[2]);
        const char *exit_line = strstr(tail, "WORKER-EXIT");
        unsigned long long steps = 0;
        CHECK(exit_line && sscanf(exit_line, "WORKER-EXIT %llu steps", &steps) == 1);
        fprintf(stderr, "the worker added mid-run trained %llu step(s)\n", steps);
        CHECK(steps > 0);
        free(tail);
    }
    cluster_destroy(&c);
    fprintf(stderr, "%s: %.1f s\n", name, kd_test_now() - t0);
}

/* ---- c) a teacher node killed mid-epoch -------------------------------------------------- */

/* restream_timeout_ms is longer than the deadline: the stall fallback (meant for batches a
 * dead worker took along) cannot stand in for reassigning the dead teacher's share at once. */
static void test_teacher_killed(const char *consistency, bool restart) {
    char name[64], mode[64];
    snprintf(name, sizeof name, "teacher_%s_%s", restart ? "restarted" : "killed", consistency);
    snprintf(mode, sizeof mode, "cluster.consistency=%s", consistency);
    const int teachers = restart ? 1 : 2, victim = teachers - 1;
    /* Paced by events: the run begins with the whole cluster, however slowly it starts. */
    char hold_teachers[48];
    snprintf(hold_teachers, sizeof hold_teachers, "cluster.start_teachers=%d", teachers);
    const char *overrides[] = {mode, "cluster.restream_timeout_ms=60000", hold_teachers,
                               "cluster.start_workers=2", NULL};
    cluster_t c;
    double t0 = kd_test_now();
    if (cluster_start(&c, name, 2, teachers, overrides)) {
        bool timed_out;
        moment_t mid = {.epoch = 1, .in_epoch = N_BATCHES / 4, .workers = 2, .teachers = teachers};
        json_t *s = wait_moment(&c, &mid, RUN_SECONDS, &timed_out);
        CHECK(s != NULL);
        if (s) {
            proc_kill(&c.teachers[victim]);
            char what[64];
            snprintf(what, sizeof what, "teacher %d killed at", victim);
            print_status(what, s);
            json_decref(s);
            /* the premise: it died with part of its share of epoch 1 not streamed */
            char *tail = proc_log_tail(&c.teachers[victim]);
            bool streamed_all = strstr(tail, "TEACHER-STREAMED epoch 1") != NULL;
            free(tail);
            if (streamed_all)
                fprintf(stderr, "%s: teacher %d had streamed its share\n", name, victim);
            if (restart) start_teacher(&c, victim);
        }
        json_t *summary = cluster_finish(&c, DEAD_SECONDS);
        if (!check_completed(&c, summary)) {
            /* what the lead needs: the death seen, and what the live teachers were given */
            show_lines(c.coord.log, "COORD-MEMBER", 8);
            show_lines(c.coord.log, "COORD-RESTREAM", 4);
            for (int t = 0; t < teachers; t++) show_lines(c.teachers[t].log, "TEACHER-", 12);
        }
        json_decref(summary);
    }
    cluster_destroy(&c);
    fprintf(stderr, "%s: %.1f s\n", name, kd_test_now() - t0);
}

/* ---- d) the coordinator killed and restarted --------------------------------------------- */

/* Truncates a file to half its size: what a write torn by a crash leaves. */
static void tear(const char *path) {
    long size = file_size(path);
    CHECK(size > 0 && truncate(path, size / 2) == 0);
    fprintf(stderr, "tore %s: %ld -> %ld bytes\n", path, size, size / 2);
}

/* Overwrites the start of a file (the safetensors header length and JSON) with garbage. */
static void scribble(const char *path) {
    FILE *f = fopen(path, "r+b");
    CHECK(f != NULL);
    if (!f) return;
    static const char garbage[64] = "\xff\xff\xff\xff\xff\xff\xff\x7f not a header";
    CHECK(fwrite(garbage, 1, sizeof garbage, f) == sizeof garbage);
    fclose(f);
    fprintf(stderr, "scribbled over the header of %s\n", path);
}

/* Flips one byte in the middle of a file (inside a tensor): nothing in the format notices,
 * only the checkpoint's digest does. */
static void flip_byte(const char *path) {
    long size = file_size(path);
    FILE *f = fopen(path, "r+b");
    CHECK(f != NULL && size > 0);
    if (!f) return;
    int c = (fseek(f, size / 2, SEEK_SET), fgetc(f));
    CHECK(c != EOF && fseek(f, size / 2, SEEK_SET) == 0 && fputc(c ^ 0x40, f) != EOF);
    fclose(f);
    fprintf(stderr, "flipped byte %ld of %s\n", size / 2, path);
}

/* The nodes came back by themselves: the same processes are members of the new coordinator. */
static void check_nodes_back(cluster_t *c) {
    bool timed_out;
    moment_t back = {.epoch = -1, .workers = 2, .teachers = 1};
    json_t *s = wait_moment(c, &back, BACK_SECONDS, &timed_out);
    CHECK(!timed_out);
    print_status("after the restart", s);
    if (s)
        CHECK(member_steps(s, c->workers[0].pid) >= 0 && member_steps(s, c->workers[1].pid) >= 0 &&
              member_steps(s, c->teachers[0].pid) >= 0);
    json_decref(s);
}

/* damaged: how many of the newest checkpoints to spoil before the restart (0, or up to 3: the
 * newest torn, the one before it scribbled over, the one before that with one byte flipped);
 * the coordinator must resume from the next one. */
static void test_coordinator_restarted(const char *consistency, int damaged, int accumulate) {
    char name[64], mode[64], acc[64];
    snprintf(name, sizeof name, "coordinator_%s_%s_acc%d", damaged ? "torn" : "restarted",
             consistency, accumulate);
    snprintf(mode, sizeof mode, "cluster.consistency=%s", consistency);
    snprintf(acc, sizeof acc, "cluster.accumulate=%d", accumulate);
    const char *overrides[] = {
        mode, acc, CKPT_EVERY, "cluster.restream_timeout_ms=1500", "checkpoint.keep=5", NULL};
    cluster_t c;
    double t0 = kd_test_now();
    if (cluster_start(&c, name, 2, 1, overrides)) {
        bool timed_out;
        /* mid-epoch, with the checkpoint(s) to come back from on disk */
        moment_t mid = {.epoch = 1,
                        .in_epoch = N_BATCHES / 4,
                        .workers = 2,
                        .teachers = 1,
                        .checkpoints = damaged + 1};
        json_t *s = wait_moment(&c, &mid, RUN_SECONDS, &timed_out);
        CHECK(s != NULL);
        if (s) {
            proc_kill(&c.coord);
            print_status("coordinator killed at", s);
            json_decref(s);
            char names[8][300], path[KD_PATH_MAX + 350], expect[KD_PATH_MAX + 350] = "";
            int n = count_checkpoints(&c, names, 8);
            bool enough = n > damaged && n <= 8;
            CHECK(enough);
            for (int k = 0; enough && k < damaged; k++) {
                snprintf(path, sizeof path, "%s/checkpoints/%s", c.dir, names[n - 1 - k]);
                if (k == 0)
                    tear(path);
                else if (k == 1)
                    scribble(path);
                else
                    flip_byte(path);
            }
            if (enough)
                snprintf(expect, sizeof expect, "resumed from %s/checkpoints/%s", c.dir,
                         names[n - 1 - damaged]);
            if (start_coordinator(&c, true)) check_nodes_back(&c);
            json_t *summary = cluster_finish(&c, RUN_SECONDS);
            check_completed(&c, summary);
            json_decref(summary);
            bool resumed = expect[0] && log_has(c.coord.log, expect);
            CHECK(resumed);
            if (!resumed) show_lines(c.coord.log, "COORD-RESUME", 2);
            for (int k = 0; enough && k < damaged; k++)
                CHECK(log_line_has(c.coord.log, "COORD-CKPT-SKIP", names[n - 1 - k]));
            if (damaged) show_lines(c.coord.log, "COORD-CKPT-SKIP", damaged);
        }
    }
    cluster_destroy(&c);
    fprintf(stderr, "%s: %.1f s\n", name, kd_test_now() - t0);
}

/* ---- e) resume keeps the newest checkpoint and the best model -------------------------- */

typedef struct {
    long step;
    double val_accuracy;
    bool best; /* the coordinator marked it "(best)" */
} eval_line_t;

/* The COORD-EVAL lines of this incarnation of the coordinator's log, up to max. */
static int eval_lines(const proc_t *coord, eval_line_t *out, int max) {
    char *tail = proc_log_tail(coord);
    int n = 0;
    for (char *p = tail; n < max && (p = strstr(p, "COORD-EVAL step ")); p++) {
        char *end = strchr(p, '\n');
        if (!end) break; /* a line still being written */
        *end = 0;
        if (sscanf(p, "COORD-EVAL step %ld: val accuracy %lf", &out[n].step,
                   &out[n].val_accuracy) == 2) {
            out[n].best = strstr(p, "(best)") != NULL;
            n++;
        }
        *end = '\n';
    }
    free(tail);
    return n;
}

/* kdist.best of checkpoints/best/student.safetensors: the step and validation accuracy it
 * holds, and its bytes (caller frees). */
static bool best_on_disk(const cluster_t *c, long *step, double *accuracy, uint8_t **bytes,
                         size_t *len) {
    char path[KD_PATH_MAX + 64], err[KD_ERR_LEN];
    snprintf(path, sizeof path, "%s/checkpoints/best/student.safetensors", c->dir);
    kd_safetensors_t *st = NULL;
    if (kd_st_open(path, &st, err, sizeof err) != 0) return false;
    const char *meta = kd_st_metadata(st, "kdist.best");
    json_t *j = meta ? json_loads(meta, 0, NULL) : NULL;
    *step = jint(j, "step");
    *accuracy = json_number_value(json_object_get(j, "score")); /* a classifier: val accuracy */
    json_decref(j);
    kd_st_close(&st);
    return meta && kd_read_file(path, bytes, len, err, sizeof err) == 0;
}

/* The coordinator is SIGKILLed right after it wrote a checkpoint (the file appeared) and, once
 * resumed, right after an evaluation worse than the best; resumed again, it keeps the best
 * score, step and file: an evaluation after the resume replaces best/ only when it beats the
 * best of the whole run (a resumed evaluator that started from zero would overwrite best/
 * with its first evaluation). Paced by events: new checkpoint files and log lines. */
static void test_resume_keeps_best(void) {
    const char *name = "resume_keeps_best";
    const char *overrides[] = {
        "cluster.consistency=sync",         CKPT_EVERY, "eval.every_steps=10", "checkpoint.keep=5",
        "cluster.restream_timeout_ms=1500", NULL};
    cluster_t c;
    double t0 = kd_test_now();
    if (!cluster_start(&c, name, 2, 1, overrides)) {
        cluster_destroy(&c);
        return;
    }
    /* 1: right after the second checkpoint file appears */
    char names[8][300], expect[KD_PATH_MAX + 350] = "";
    int n = 0;
    double deadline = kd_test_now() + RUN_SECONDS;
    while ((n = count_checkpoints(&c, names, 8)) < 2 && proc_running(&c.coord) &&
           kd_test_now() < deadline)
        nanosleep(&(struct timespec){0, 2 * 1000 * 1000}, NULL);
    CHECK(n >= 2 && n <= 8);
    if (n >= 2 && n <= 8) {
        proc_kill(&c.coord);
        n = count_checkpoints(&c, names, 8); /* one more may have landed before the kill */
        snprintf(expect, sizeof expect, "resumed from %s/checkpoints/%s", c.dir, names[n - 1]);
        fprintf(stderr, "%s: coordinator killed right after %s\n", name, names[n - 1]);
        if (start_coordinator(&c, true)) CHECK(log_has(c.coord.log, expect));
    }
    /* 2: right after an evaluation that is not the best */
    eval_line_t evals[512];
    int ne = 0;
    bool worse = false;
    while (!worse && proc_running(&c.coord) && kd_test_now() < deadline) {
        ne = eval_lines(&c.coord, evals, 512);
        for (int i = 0; i < ne && !worse; i++) worse = !evals[i].best;
        if (!worse) nanosleep(&(struct timespec){0, 2 * 1000 * 1000}, NULL);
    }
    CHECK(worse);
    if (!worse) {
        show_lines(c.coord.log, "COORD-EVAL", 10);
        cluster_destroy(&c);
        return;
    }
    proc_kill(&c.coord);
    long best_step = -1;
    double best_accuracy = 0;
    uint8_t *best_bytes = NULL;
    size_t best_len = 0;
    CHECK(best_on_disk(&c, &best_step, &best_accuracy, &best_bytes, &best_len));
    fprintf(stderr,
            "%s: coordinator killed after a worse evaluation; best/ holds step %ld (%.4f)\n", name,
            best_step, best_accuracy);
    /* best/ holds the best of the evaluations logged so far, or a better one the evaluator
     * saved after them that the coordinator had not logged yet when it was killed */
    ne = eval_lines(&c.coord, evals, 512);
    double seen_best = 0;
    long last_logged = -1;
    for (int i = 0; i < ne; i++) {
        if (evals[i].best) seen_best = evals[i].val_accuracy;
        if (evals[i].step > last_logged) last_logged = evals[i].step;
    }
    if (best_step > last_logged)
        CHECK(best_accuracy > seen_best - 1e-9);
    else
        CHECK(fabs(seen_best - best_accuracy) < 1e-9);

    start_coordinator(&c, true);
    json_t *summary = cluster_finish(&c, RUN_SECONDS);
    check_completed(&c, summary);
    /* after the resume, "(best)" exactly when an evaluation beats the best so far */
    ne = eval_lines(&c.coord, evals, 512);
    double running = best_accuracy;
    long running_step = best_step;
    int marked_wrong = 0;
    for (int i = 0; i < ne; i++) {
        bool beats = evals[i].val_accuracy > running + 1e-9; /* logged to 4 places: k/5000 */
        if (beats != evals[i].best) marked_wrong++;
        if (beats) running = evals[i].val_accuracy, running_step = evals[i].step;
    }
    CHECK(ne > 0);
    CHECK(marked_wrong == 0);
    if (marked_wrong) show_lines(c.coord.log, "COORD-EVAL", 20);
    CHECK(fabs(json_number_value(json_object_get(summary, "best_val_accuracy")) - running) < 1e-9);
    CHECK(jint(summary, "best_step") == running_step);
    long step = -1;
    double accuracy = 0;
    uint8_t *bytes = NULL;
    size_t len = 0;
    CHECK(best_on_disk(&c, &step, &accuracy, &bytes, &len));
    CHECK(step == running_step && fabs(accuracy - running) < 1e-9);
    if (running_step == best_step) CHECK(len == best_len && memcmp(bytes, best_bytes, len) == 0);
    fprintf(stderr, "%s: %d evaluations after the resume, best step %ld (%.4f)%s\n", name, ne,
            running_step, running, running_step == best_step ? ", best/ unchanged" : "");
    free(bytes);
    free(best_bytes);
    json_decref(summary);
    cluster_destroy(&c);
    fprintf(stderr, "%s: %.1f s\n", name, kd_test_now() - t0);
}

/* ---- f) random faults -------------------------------------------------------------------- */

enum { ROLE_WORKER, ROLE_TEACHER, ROLE_COORDINATOR, N_ROLES };
static const char *const role_names[N_ROLES] = {"worker", "teacher", "coordinator"};

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static long rand_below(uint64_t *rng, long n) {
    return (long)(splitmix64(rng) % (uint64_t)n);
}

static int cmp_long(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

/* Kills one process of the role and starts it again: the coordinator with --resume on its
 * endpoint, a teacher or worker as a new process under the same id. */
static void kill_and_restart(cluster_t *c, int role, int id) {
    if (role == ROLE_COORDINATOR) {
        proc_kill(&c->coord);
        start_coordinator(c, true);
    } else if (role == ROLE_TEACHER) {
        proc_kill(&c->teachers[id]);
        start_teacher(c, id);
    } else {
        proc_kill(&c->workers[id]);
        start_worker(c, id);
    }
}

/* One run with 3-5 kills at random points between 5% and 85% of its batches. Before each kill
 * every member is back, so each fault strikes a whole cluster. Adds the kills it survived to
 * survived; returns whether it did. */
static bool random_run(int run, uint64_t *rng, long survived[N_ROLES]) {
    static const char *const modes[] = {"cluster.consistency=sync", "cluster.consistency=async",
                                        "cluster.consistency=ssp"};
    const int workers = 2, teachers = 1 + (int)rand_below(rng, 2);
    const int n_kills = 3 + (int)rand_below(rng, 3);
    long at[5];
    for (int k = 0; k < n_kills; k++) at[k] = TOTAL / 20 + rand_below(rng, TOTAL * 80 / 100);
    qsort(at, (size_t)n_kills, sizeof at[0], cmp_long);
    int roles[5], ids[5];
    for (int k = 0; k < n_kills; k++) {
        roles[k] = (int)rand_below(rng, N_ROLES);
        ids[k] = roles[k] == ROLE_COORDINATOR
                     ? 0
                     : (int)rand_below(rng, roles[k] == ROLE_WORKER ? workers : teachers);
    }
    char name[64];
    snprintf(name, sizeof name, "random_%02d", run);
    /* every other run: chunked pushes over TCP, applied as they come whenever one worker is up */
    const bool overlap = run % 2 == 1;
    const char *overrides[] = {modes[run % 3],
                               "cluster.staleness=1",
                               CKPT_EVERY,
                               "cluster.restream_timeout_ms=1500",
                               overlap ? "cluster.overlap=true" : "cluster.overlap=false",
                               overlap ? "cluster.shared_memory=false"
                                       : "cluster.shared_memory=true",
                               NULL};
    cluster_t c;
    long killed[N_ROLES] = {0};
    double t0 = kd_test_now();
    fprintf(stderr, "%s: %s%s, %d teacher(s), plan:", name, modes[run % 3] + 20,
            overlap ? " overlap" : "", teachers);
    for (int k = 0; k < n_kills; k++)
        fprintf(stderr, " %s %d at %ld;", role_names[roles[k]], ids[k], at[k]);
    fprintf(stderr, "\n");
    bool timed_out = false, ok = false;
    if (cluster_start(&c, name, workers, teachers, overrides)) {
        for (int k = 0; k < n_kills; k++) {
            moment_t m = {.epoch = -1, .applied = at[k], .workers = workers, .teachers = teachers};
            json_t *s = wait_moment(&c, &m, BACK_SECONDS, &timed_out);
            CHECK(!timed_out); /* the cluster came back after the last fault */
            if (!s) break;     /* the run ended first, or is stuck */
            kill_and_restart(&c, roles[k], ids[k]);
            killed[roles[k]]++;
            char what[96];
            snprintf(what, sizeof what, "%s: killed and restarted %s %d at", name,
                     role_names[roles[k]], ids[k]);
            print_status(what, s);
            json_decref(s);
        }
        json_t *summary = cluster_finish(&c, timed_out ? 10.0 : RUN_SECONDS);
        ok = check_completed(&c, summary) && !timed_out;
        if (ok) {
            for (int r = 0; r < N_ROLES; r++) survived[r] += killed[r];
        } else {
            show_lines(c.coord.log, "COORD-", 20);
        }
        json_decref(summary);
    }
    cluster_destroy(&c);
    fprintf(stderr, "%s: %.1f s\n", name, kd_test_now() - t0);
    return ok;
}

static void test_random_faults(void) {
    const char *seed_text = getenv("KD_FAULT_SEED"), *runs_text = getenv("KD_FAULT_RUNS");
    uint64_t seed = seed_text ? strtoull(seed_text, NULL, 0)
                              : (uint64_t)time(NULL) * 1000003u ^ (uint64_t)getpid();
    long runs = 10;
    if (runs_text && (kd_parse_long(runs_text, &runs) != 0 || runs < 0)) {
        fprintf(stderr, "KD_FAULT_RUNS must be a count, not '%s'\n", runs_text);
        CHECK(false);
        return;
    }
    fprintf(stderr, "random faults: %ld run(s), KD_FAULT_SEED=%" PRIu64 " (set it to repeat)\n",
            runs, seed);
    uint64_t rng = seed;
    long survived[N_ROLES] = {0};
    double t0 = kd_test_now();
    /* A failed run ends the part: its plan and the seed above reproduce it, and a broken
     * product would otherwise spend every run's deadlines. */
    long done = 0;
    while (done < runs && random_run((int)done, &rng, survived)) done++;
    if (done < runs) fprintf(stderr, "random faults: run %ld failed; the rest not run\n", done);
    fprintf(stderr,
            "random faults: kills survived: %ld worker, %ld teacher, %ld coordinator "
            "(%ld runs, %.1f s, KD_FAULT_SEED=%" PRIu64 ")\n",
            survived[ROLE_WORKER], survived[ROLE_TEACHER], survived[ROLE_COORDINATOR], done,
            kd_test_now() - t0, seed);
}

int main(void) {
    tmp = kd_test_tmpdir("test_faults");
    snprintf(recipe, sizeof recipe, "%s/faults.yaml", tmp);
    char err[KD_ERR_LEN];
    if (kd_write_file_atomic(recipe, recipe_text, strlen(recipe_text), err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    double t0 = kd_test_now();
    test_worker_killed("sync", 1, false);
    test_worker_killed("async", 1, false);
    test_worker_killed("ssp", 1, false);
    test_worker_killed("sync", 2, false);
    test_worker_killed("sync", 1, true);
    test_worker_added("sync");
    test_worker_added("ssp");
    test_coordinator_restarted("sync", 0, 1);
    test_coordinator_restarted("async", 0, 1);
    test_coordinator_restarted("sync", 3, 1);
    test_coordinator_restarted("async", 0, 2);
    test_resume_keeps_best();
    test_teacher_killed("sync", false);
    test_teacher_killed("async", false);
    test_teacher_killed("sync", true);
    test_random_faults();
    fprintf(stderr, "test_faults: %.1f s in all\n", kd_test_now() - t0);
    return kd_test_done("test_faults");
}
