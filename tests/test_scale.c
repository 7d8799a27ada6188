/* test_scale: membership changes of a running `kdist run` (DESIGN §8-9). `kdist scale` 1 -> 3
 * starts workers that train, `kdist drain` and `kdist scale` 3 -> 1 make workers leave after
 * their step, and the run still completes with an exactly-once ledger and exit 0. With
 * cluster.restart_failed a SIGKILLed worker comes back with its id and the run completes;
 * without it the crash fails the run, naming the worker, the signal and its log. Errors of
 * scale and drain name the run directory and what is wrong. Spawns processes. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "kd_test.h"
#include "kd_test_cluster.h"
#include "kd_util.h"

extern char **environ;

#define RUN_DEADLINE   240.0 /* seconds for a whole `kdist run` (ASan runs are ~3x slower) */
#define EVENT_DEADLINE 60.0  /* seconds for one membership change or the first steps */
/* The scaled run must outlast the scenario (a few seconds) many times over, even on a fast
 * machine: about 15 s here without sanitizers. */
#define SCALE_EPOCHS "train.epochs=60"

#define DIR_MAX (KD_PATH_MAX + 256)

static char kdist[KD_PATH_MAX];
static char out_buf[65536];

static const char *recipe_text = "name: scale_test\n"
                                 "seed: 5\n"
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
                                 "  lr: 0.05\n"
                                 "  momentum: 0.9\n"
                                 "schedule:\n"
                                 "  name: constant\n"
                                 "train:\n"
                                 "  epochs: 1\n"
                                 "  batch_size: 128\n"
                                 "  threads: 1\n"
                                 "data:\n"
                                 "  train_subset: 12000\n"
                                 "  val_size: 1000\n"
                                 "  test_subset: 1000\n"
                                 "cluster:\n"
                                 "  workers: 1\n"
                                 "  teachers: 1\n"
                                 /* a drained worker's prefetched batches come back this soon */
                                 "  restream_timeout_ms: 3000\n"
                                 "  heartbeat_timeout_ms: 4000\n";

/* Runs a kdist command to completion (deadline), its output in out_buf; the exit code. */
static int kd(const char *tmp, double seconds, ...) {
    char *argv[16];
    int n = 0;
    argv[n++] = kdist;
    va_list ap;
    va_start(ap, seconds);
    for (char *a; n < 15 && (a = va_arg(ap, char *));) argv[n++] = a;
    va_end(ap);
    argv[n] = NULL;
    char out[KD_PATH_MAX + 32];
    snprintf(out, sizeof out, "%s/cmd.txt", tmp);
    return kd_test_capture_finish(argv, out, seconds, out_buf, sizeof out_buf);
}

/* ---- a running cluster, seen through `kdist status --json` and launcher.json ------------- */

typedef struct {
    const char *tmp;
    char dir[DIR_MAX];
    char out[DIR_MAX]; /* kdist run's output */
    pid_t pid;         /* kdist run */
} cluster_t;

static bool start_run(cluster_t *c, const char *tmp, const char *recipe, const char *name,
                      const char *run_dir, const char **extra, int n_extra) {
    memset(c, 0, sizeof *c);
    c->tmp = tmp;
    snprintf(c->dir, sizeof c->dir, "%s", run_dir);
    snprintf(c->out, sizeof c->out, "%s/%s.out", tmp, name);
    char name_arg[128];
    snprintf(name_arg, sizeof name_arg, "name=%s", name);
    char *argv[32];
    int n = 0;
    argv[n++] = kdist;
    argv[n++] = "run";
    argv[n++] = (char *)recipe;
    argv[n++] = name_arg;
    argv[n++] = "--run-dir";
    argv[n++] = c->dir;
    for (int i = 0; i < n_extra && n < 31; i++) argv[n++] = (char *)extra[i];
    argv[n] = NULL;
    c->pid = kd_test_start(c->out, argv);
    return c->pid > 0;
}

/* The coordinator's StatusReply (caller decrefs), or NULL if it did not answer. */
static json_t *status_of(cluster_t *c) {
    if (kd(c->tmp, 15, "status", c->dir, "--json", NULL) != 0) return NULL;
    return json_loads(out_buf, 0, NULL);
}

static json_t *member(json_t *status, const char *role, const char *id) {
    size_t i;
    json_t *m;
    json_array_foreach(json_object_get(status, "members"), i, m) {
        const char *r = json_string_value(json_object_get(m, "role"));
        const char *mid = json_string_value(json_object_get(m, "id"));
        if (r && mid && strcmp(r, role) == 0 && strcmp(mid, id) == 0) return m;
    }
    return NULL;
}

static int count_role(json_t *status, const char *role) {
    int n = 0;
    size_t i;
    json_t *m;
    json_array_foreach(json_object_get(status, "members"), i, m) {
        const char *r = json_string_value(json_object_get(m, "role"));
        if (r && strcmp(r, role) == 0) n++;
    }
    return n;
}

/* Every listed worker is a member with steps > 0, and there are exactly `workers` workers and
 * one teacher. ids: a NULL-terminated list. */
static bool training(json_t *status, int workers, const char *const *ids) {
    if (!status || count_role(status, "worker") != workers || count_role(status, "teacher") != 1)
        return false;
    for (; *ids; ids++) {
        json_t *m = member(status, "worker", *ids);
        if (!m || json_integer_value(json_object_get(m, "steps")) <= 0) return false;
    }
    return true;
}

/* Polls the status until training(...) holds; false when the deadline passes or the run ends. */
static bool wait_training(cluster_t *c, int workers, const char *const *ids) {
    double deadline = kd_now() + EVENT_DEADLINE;
    while (kd_now() < deadline) {
        if (waitpid(c->pid, NULL, WNOHANG) == c->pid) {
            fprintf(stderr, "kdist run ended early; its output:\n");
            kd_test_show_log(c->out);
            c->pid = -1;
            return false;
        }
        json_t *s = status_of(c);
        bool ok = training(s, workers, ids);
        json_decref(s);
        if (ok) return true;
        usleep(100000);
    }
    fprintf(stderr, "%s: no %d training worker(s) within %.0f s\n", c->dir, workers,
            EVENT_DEADLINE);
    return false;
}

/* A child of launcher.json: its pid and restart count (-1 when absent). */
static pid_t launcher_child(const char *dir, const char *role, int id, int *restarts) {
    char path[DIR_MAX + 64];
    snprintf(path, sizeof path, "%s/launcher.json", dir);
    json_t *root = json_load_file(path, 0, NULL);
    pid_t pid = -1;
    size_t i;
    json_t *ch;
    json_array_foreach(json_object_get(root, "children"), i, ch) {
        const char *r = json_string_value(json_object_get(ch, "role"));
        if (!r || strcmp(r, role) != 0 || json_integer_value(json_object_get(ch, "id")) != id)
            continue;
        pid = (pid_t)json_integer_value(json_object_get(ch, "pid"));
        if (restarts) *restarts = (int)json_integer_value(json_object_get(ch, "restarts"));
    }
    json_decref(root);
    return pid;
}

/* summary.json: completed, every batch applied once, a student that learned something. A
 * dropped duplicate needs a second copy of its batch, which only a restream makes; a worker
 * that leaves (killed or drained) makes the coordinator restream the unapplied batches of the
 * epoch at once, including some still in flight elsewhere, so those runs may drop a few. */
static void check_summary(const char *dir) {
    char path[DIR_MAX + 64];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    json_t *s = json_load_file(path, 0, NULL);
    CHECK(json_is_object(s));
    const char *status = json_string_value(json_object_get(s, "status"));
    CHECK(status && strcmp(status, "completed") == 0);
    json_t *ledger = json_object_get(s, "ledger");
    json_int_t applied = json_integer_value(json_object_get(ledger, "batches_applied"));
    json_int_t expected = json_integer_value(json_object_get(ledger, "batches_expected"));
    json_int_t dups = json_integer_value(json_object_get(ledger, "duplicates_dropped"));
    json_int_t restreamed = json_integer_value(json_object_get(ledger, "restreamed"));
    CHECK(expected > 0 && applied == expected);
    CHECK(json_is_integer(json_object_get(ledger, "duplicates_dropped")) && dups >= 0 &&
          dups <= restreamed);
    double acc = json_number_value(json_object_get(s, "test_accuracy"));
    CHECK(acc >= 0.5 && acc <= 1.0);
    fprintf(stderr,
            "%s: %s, %lld/%lld batches, %lld duplicates, %lld restreamed, test accuracy "
            "%.3f\n",
            dir, status ? status : "?", (long long)applied, (long long)expected, (long long)dups,
            (long long)restreamed, acc);
    json_decref(s);
}

/* ---- the cases --------------------------------------------------------------------------- */

/* 1 -> 3 workers, the new ones train; drain one; 3 -> 1; the run completes exactly once. */
static void test_scale_and_drain(const char *tmp, const char *recipe) {
    cluster_t c;
    char dir[DIR_MAX];
    snprintf(dir, sizeof dir, "%s/runs/scaled", tmp);
    const char *extra[] = {SCALE_EPOCHS};
    CHECK(start_run(&c, tmp, recipe, "scaled", dir, extra, 1));
    static const char *const w0[] = {"0", NULL}, *const w012[] = {"0", "1", "2", NULL};
    static const char *const w02[] = {"0", "2", NULL};
    bool ok = wait_training(&c, 1, w0);
    CHECK(ok);
    if (!ok) goto stop;

    double t0 = kd_now();
    CHECK(kd(tmp, 90, "scale", dir, "--workers", "3", NULL) == 0);
    CHECK_ERR_HAS(out_buf, "from 1 to 3 workers");
    CHECK_ERR_HAS(out_buf, "started: 1, 2");
    CHECK_ERR_HAS(out_buf, "3 live workers");
    CHECK_ERR_HAS(out_buf, "ROLE");
    fprintf(stderr, "scale 1 -> 3 took %.1f s\n", kd_now() - t0);
    json_t *s = status_of(&c);
    CHECK(s && count_role(s, "worker") == 3);
    json_decref(s);
    CHECK(wait_training(&c, 3, w012)); /* the new workers push gradients */
    /* joining costs nothing twice: no batch streamed again, none dropped */
    s = status_of(&c);
    CHECK(s && json_integer_value(json_object_get(s, "duplicates_dropped")) == 0);
    CHECK(s && json_integer_value(json_object_get(s, "restreamed")) == 0);
    json_decref(s);

    /* A worker that is not there: the error names the live ones. */
    CHECK(kd(tmp, 30, "drain", dir, "7", NULL) == 1);
    CHECK_ERR_HAS(out_buf, "no live worker '7'");
    CHECK_ERR_HAS(out_buf, "live workers:");
    CHECK_ERR_HAS(out_buf, "2");

    t0 = kd_now();
    CHECK(kd(tmp, 90, "drain", dir, "1", NULL) == 0);
    CHECK_ERR_HAS(out_buf, "worker 1 drained");
    fprintf(stderr, "drain took %.1f s\n", kd_now() - t0);
    s = status_of(&c);
    CHECK(s && count_role(s, "worker") == 2 && !member(s, "worker", "1"));
    json_decref(s);
    CHECK(wait_training(&c, 2, w02));

    t0 = kd_now();
    CHECK(kd(tmp, 90, "scale", dir, "--workers", "1", NULL) == 0);
    CHECK_ERR_HAS(out_buf, "from 2 to 1 worker");
    CHECK_ERR_HAS(out_buf, "draining: 2");
    CHECK_ERR_HAS(out_buf, "1 live worker: 0");
    fprintf(stderr, "scale 2 -> 1 took %.1f s\n", kd_now() - t0);
    s = status_of(&c);
    const char *state = json_string_value(json_object_get(s, "status"));
    CHECK(state && strcmp(state, "running") == 0); /* all of it happened mid-run */
    CHECK(s && count_role(s, "worker") == 1 && member(s, "worker", "0"));
    if (s)
        fprintf(stderr, "scenario done at step %lld of %lld\n",
                (long long)json_integer_value(json_object_get(s, "step")),
                (long long)json_integer_value(json_object_get(s, "total_steps")));
    json_decref(s);

stop:;
    int rc = kd_test_finish(c.pid, RUN_DEADLINE);
    kd_test_slurp(c.out, out_buf, sizeof out_buf);
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "kdist run said:\n%s\n", out_buf);
    CHECK_ERR_HAS(out_buf, "worker 2 (pid");
    CHECK_ERR_HAS(out_buf, "was drained and left");
    check_summary(dir);
    /* The drained workers left cleanly and stayed gone. */
    int restarts = -1;
    CHECK(launcher_child(dir, "worker", 1, &restarts) > 0 && restarts == 0);
    CHECK(launcher_child(dir, "worker", 2, &restarts) > 0 && restarts == 0);

    /* The run is over: scaling it is an error that says so. */
    CHECK(kd(tmp, 30, "scale", dir, "--workers", "2", NULL) == 1);
    CHECK_ERR_HAS(out_buf, "coordinator.endpoint does not exist");
}

/* cluster.restart_failed: a SIGKILLed worker is restarted with its id; the run completes. The
 * run directory is too long for an ipc:// address, so the launcher's and the coordinator's
 * control channels live in private /tmp directories (never TCP). */
static void test_restart_failed(const char *tmp, const char *recipe) {
    cluster_t c;
    char dir[DIR_MAX];
    snprintf(dir, sizeof dir,
             "%s/runs/a_run_directory_whose_path_is_longer_than_a_unix_socket_address_can_hold_"
             "so_that_the_control_channels_go_to_tmp",
             tmp);
    const char *extra[] = {"cluster.restart_failed=true", "cluster.workers=2", SCALE_EPOCHS};
    CHECK(start_run(&c, tmp, recipe, "restarted", dir, extra, 3));
    static const char *const w01[] = {"0", "1", NULL}, *const w012[] = {"0", "1", "2", NULL};
    bool ok = wait_training(&c, 2, w01);
    CHECK(ok);
    if (!ok) goto stop;

    int restarts = -1;
    pid_t victim = launcher_child(dir, "worker", 1, &restarts);
    CHECK(victim > 0 && restarts == 0);
    if (victim > 0) kill(victim, SIGKILL);
    /* launcher.json shows the new incarnation; the coordinator sees it train */
    pid_t again = -1;
    double deadline = kd_now() + EVENT_DEADLINE;
    while (kd_now() < deadline) {
        again = launcher_child(dir, "worker", 1, &restarts);
        if (again > 0 && again != victim && restarts == 1) break;
        usleep(50000);
    }
    CHECK(again > 0 && again != victim && restarts == 1);
    /* the coordinator knows the new incarnation (the old one may linger until its Hello) */
    bool back = false;
    deadline = kd_now() + EVENT_DEADLINE;
    while (!back && kd_now() < deadline) {
        json_t *s = status_of(&c);
        json_t *m = member(s, "worker", "1");
        back = m && json_integer_value(json_object_get(m, "pid")) == again &&
               json_integer_value(json_object_get(m, "steps")) > 0 && count_role(s, "worker") == 2;
        json_decref(s);
        if (!back) usleep(100000);
    }
    CHECK(back);

    /* Scaling through the private /tmp directory; the new worker gets a fresh id, not the
     * restarted one's. */
    char path[DIR_MAX + 64], text[8192];
    snprintf(path, sizeof path, "%s/launcher.json", dir);
    kd_test_slurp(path, text, sizeof text);
    CHECK_ERR_HAS(text, "\"control_endpoint\": \"ipc:///tmp/kdist-launcher-");
    CHECK(kd(tmp, 90, "scale", dir, "--workers", "3", NULL) == 0);
    CHECK_ERR_HAS(out_buf, "started: 2");
    CHECK(wait_training(&c, 3, w012));

stop:;
    int rc = kd_test_finish(c.pid, RUN_DEADLINE);
    kd_test_slurp(c.out, out_buf, sizeof out_buf);
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "kdist run said:\n%s\n", out_buf);
    CHECK_ERR_HAS(out_buf, "worker 1 (pid");
    CHECK_ERR_HAS(out_buf, "killed by signal 9");
    CHECK_ERR_HAS(out_buf, "restarting it");
    CHECK_ERR_HAS(out_buf, "restarts             worker 1 (1x)");
    check_summary(dir);
    snprintf(path, sizeof path, "%s/logs/worker-1.log", dir);
    kd_test_slurp(path, text, sizeof text);
    CHECK_ERR_HAS(text, "worker 1 crashed (killed by signal 9");
}

/* Without cluster.restart_failed a crash fails the run and names the worker and its log. */
static void test_crash_fails(const char *tmp, const char *recipe) {
    cluster_t c;
    char dir[DIR_MAX];
    snprintf(dir, sizeof dir, "%s/runs/crashed", tmp);
    const char *extra[] = {"train.epochs=50"};
    CHECK(start_run(&c, tmp, recipe, "crashed", dir, extra, 1));
    static const char *const w0[] = {"0", NULL};
    bool ok = wait_training(&c, 1, w0);
    CHECK(ok);
    pid_t victim = ok ? launcher_child(dir, "worker", 0, NULL) : -1;
    CHECK(victim > 0);
    if (victim > 0) kill(victim, SIGKILL);
    double t0 = kd_now();
    int rc = kd_test_finish(c.pid, RUN_DEADLINE);
    kd_test_slurp(c.out, out_buf, sizeof out_buf);
    CHECK(rc == 1);
    CHECK(kd_now() - t0 < 60.0); /* the last worker gone: the run stops, it does not hang */
    CHECK_ERR_HAS(out_buf, "error: worker 0 (pid");
    CHECK_ERR_HAS(out_buf, "crashed: killed by signal 9");
    CHECK_ERR_HAS(out_buf, "/logs/worker-0.log");
    CHECK_ERR_HAS(out_buf, "cluster.restart_failed");
    CHECK_ERR_HAS(out_buf, "no worker is left");
    CHECK_ERR_HAS(out_buf, "worker 0 failed");
}

/* Errors that need no cluster: they name the directory and what is missing. */
static void test_errors(const char *tmp) {
    char empty[DIR_MAX], missing[DIR_MAX], path[DIR_MAX + 64], err[KD_ERR_LEN];
    snprintf(empty, sizeof empty, "%s/not_a_run", tmp);
    snprintf(missing, sizeof missing, "%s/no_such_dir", tmp);
    CHECK(kd_mkdirs(empty, err, sizeof err) == 0);

    CHECK(kd(tmp, 30, "drain", missing, "0", NULL) == 1);
    CHECK_ERR_HAS(out_buf, "no such run directory");
    CHECK_ERR_HAS(out_buf, "no_such_dir");
    CHECK(kd(tmp, 30, "scale", missing, "--workers", "2", NULL) == 1);
    CHECK_ERR_HAS(out_buf, "no such run directory");
    CHECK(kd(tmp, 30, "drain", empty, "0", NULL) == 1);
    CHECK_ERR_HAS(out_buf, "not_a_run/coordinator.endpoint does not exist");
    CHECK(kd(tmp, 30, "scale", empty, "--workers", "2", NULL) == 1);
    CHECK_ERR_HAS(out_buf, "no coordinator is running");

    CHECK(kd(tmp, 30, "scale", empty, NULL) == 2);
    CHECK_ERR_HAS(out_buf, "--workers N is required");
    CHECK(kd(tmp, 30, "scale", empty, "--workers", "0", NULL) == 2);
    CHECK_ERR_HAS(out_buf, "at least 1");
    CHECK(kd(tmp, 30, "drain", empty, NULL) == 2);
    CHECK_ERR_HAS(out_buf, "usage: kdist drain");

    /* A run whose launcher is gone (its pid is a reaped child of ours). */
    char *true_argv[] = {"/bin/true", NULL};
    snprintf(path, sizeof path, "%s/true.txt", tmp);
    pid_t dead = kd_test_start(path, true_argv);
    CHECK(dead > 0 && kd_test_finish(dead, 10) == 0);
    snprintf(path, sizeof path, "%s/coordinator.endpoint", empty);
    kd_test_write_text(path, "tcp://127.0.0.1:9\n");
    char json[256];
    snprintf(json, sizeof json,
             "{\"launcher_pid\": %d, \"control_endpoint\": \"tcp://127.0.0.1:9\"}", (int)dead);
    snprintf(path, sizeof path, "%s/launcher.json", empty);
    kd_test_write_text(path, json);
    CHECK(kd(tmp, 30, "scale", empty, "--workers", "2", NULL) == 1);
    CHECK_ERR_HAS(out_buf, "is not running");
    /* ... and a coordinator that does not answer: drain says so within its deadline */
    double t0 = kd_now();
    CHECK(kd(tmp, 30, "drain", empty, "0", NULL) == 1);
    CHECK(kd_now() - t0 < 15.0);
    CHECK_ERR_HAS(out_buf, "did not answer");
}

int main(void) {
    snprintf(kdist, sizeof kdist, "%s", kd_test_bin("kdist"));
    const char *tmp = kd_test_tmpdir("test_scale");
    char recipe[KD_PATH_MAX + 32];
    snprintf(recipe, sizeof recipe, "%s/scale.yaml", tmp);
    kd_test_write_text(recipe, recipe_text);

    double t0 = kd_now();
    test_errors(tmp);
    test_scale_and_drain(tmp, recipe);
    fprintf(stderr, "scale and drain: %.1f s\n", kd_now() - t0);
    t0 = kd_now();
    test_restart_failed(tmp, recipe);
    fprintf(stderr, "restart_failed: %.1f s\n", kd_now() - t0);
    t0 = kd_now();
    test_crash_fails(tmp, recipe);
    fprintf(stderr, "crash without restart: %.1f s\n", kd_now() - t0);
    return kd_test_done("test_scale");
}
