/* test_run: `kdist run` as a user runs it — a local cluster (coordinator, teacher, two workers)
 * on a short recipe exits 0 and leaves the run directory of DESIGN §7 with an exactly-once
 * ledger; `kdist status` against a running cluster shows its members; Ctrl-C stops it cleanly
 * with no process left; recipe errors exit 2 with file:line:col; cluster.wire bf16 and fp16
 * train as fp32 does, within the rounding. Spawns processes. */
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <math.h>
#include <jansson.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "kd_safetensors.h"
#include "kd_test.h"
#include "kd_test_cluster.h"
#include "kd_util.h"

extern char **environ;

static char kdist[KD_PATH_MAX];
static char out_buf[65536];

/* The cluster is small and quick: a 784-64-10 MLP on a few thousand samples. */
static const char *recipe_text = "name: run_test\n"
                                 "seed: 3\n"
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
                                 "cluster:\n"
                                 "  workers: 2\n"
                                 "  teachers: 1\n";

/* Runs argv to completion (deadline), output in out_buf; returns the exit code. */
static int run_argv(const char *tmp, double seconds, char *const argv[]) {
    char out[KD_PATH_MAX + 32];
    snprintf(out, sizeof out, "%s/out.txt", tmp);
    return kd_test_capture_finish(argv, out, seconds, out_buf, sizeof out_buf);
}

/* A short run to the end: exit 0, every output of DESIGN §7, the ledger exactly once. */
static void test_run_completes(const char *tmp, const char *recipe) {
    char runs[KD_PATH_MAX + 32], dir[KD_PATH_MAX + 64], runs_arg[KD_PATH_MAX + 64];
    snprintf(runs, sizeof runs, "%s/runs", tmp);
    snprintf(runs_arg, sizeof runs_arg, "logging.runs_dir=%s", runs);
    snprintf(dir, sizeof dir, "%s/run_ok", runs);
    char *argv[] = {kdist,
                    "run",
                    (char *)recipe,
                    "name=run_ok",
                    runs_arg,
                    "data.train_subset=3000",
                    "data.val_size=500",
                    "data.test_subset=500",
                    NULL};
    int rc = run_argv(tmp, 300, argv);
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "kdist run said:\n%s\n", out_buf);
    CHECK_ERR_HAS(out_buf, "test accuracy");
    CHECK_ERR_HAS(out_buf, "student.safetensors");

    const char *files[] = {
        "recipe.yaml",       "metrics.jsonl",    "student.safetensors",    "summary.json",
        "launcher.json",     "checkpoints",      "logs/coordinator-0.log", "logs/teacher-0.log",
        "logs/worker-0.log", "logs/worker-1.log"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        bool ok = kd_test_exists_in(dir, files[i]);
        CHECK(ok);
        if (!ok) fprintf(stderr, "missing %s/%s\n", dir, files[i]);
    }
    CHECK(!kd_test_exists_in(dir, "coordinator.endpoint")); /* the coordinator is gone */
    char pattern[KD_PATH_MAX + 128];
    snprintf(pattern, sizeof pattern, "%s/events.out.tfevents.*", dir);
    glob_t g;
    CHECK(glob(pattern, 0, NULL, &g) == 0 && g.gl_pathc == 1);
    globfree(&g);

    char path[KD_PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    json_t *s = json_load_file(path, 0, NULL);
    CHECK(json_is_object(s));
    json_t *ledger = json_object_get(s, "ledger");
    const char *status = json_string_value(json_object_get(s, "status"));
    CHECK(status && strcmp(status, "completed") == 0);
    json_int_t applied = json_integer_value(json_object_get(ledger, "batches_applied"));
    json_int_t expected = json_integer_value(json_object_get(ledger, "batches_expected"));
    CHECK(expected == (2500 + 127) / 128); /* one epoch of 2500 training samples */
    CHECK(applied == expected);
    CHECK(json_is_integer(json_object_get(ledger, "duplicates_dropped")) &&
          json_integer_value(json_object_get(ledger, "duplicates_dropped")) == 0);
    double acc = json_number_value(json_object_get(s, "test_accuracy"));
    CHECK(acc > 0.3); /* ten steps learn something: chance is 0.1 (sync steps vary with timing) */
    if (!(acc > 0.3)) fprintf(stderr, "test accuracy %.3f\n", acc);
    json_decref(s);

    /* A second run of the same name starts fresh: the old outputs go first. */
    rc = run_argv(tmp, 300, argv);
    CHECK(rc == 0);
    CHECK(glob(pattern, 0, NULL, &g) == 0 && g.gl_pathc == 1);
    globfree(&g);
}

/* The weights of a run's student.safetensors as one vector (tensor order), in *n. */
static float *student_weights(const char *dir, size_t *n) {
    char path[KD_PATH_MAX + 128], err[KD_ERR_LEN];
    snprintf(path, sizeof path, "%s/student.safetensors", dir);
    kd_safetensors_t *f = NULL;
    *n = 0;
    if (kd_st_open(path, &f, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return NULL;
    }
    size_t total = 0;
    for (int i = 0; i < kd_st_count(f); i++) total += kd_st_tensor(f, i)->nbytes / sizeof(float);
    float *v = kd_xmalloc((total + 1) * sizeof(float));
    for (int i = 0; i < kd_st_count(f); i++) {
        const kd_st_tensor_t *t = kd_st_tensor(f, i);
        memcpy(v + *n, kd_st_data(f, t), t->nbytes); /* the data need not be aligned */
        *n += t->nbytes / sizeof(float);
    }
    kd_st_close(&f);
    return v;
}

/* cluster.wire: one sync worker over TCP with the weights and gradients as bf16, then fp16,
 * completes with a whole ledger; the student ends near the fp32 run's (each step's rounding is
 * a relative 2^-9 or 2^-12: the weights move by a few percent of their norm over the run, not
 * more) yet not on it (the 16 bits were used), and the coordinator's weights are still fp32
 * (most are not bf16 values: the master copy is not rounded). */
static void test_wire_formats(const char *tmp, const char *recipe) {
    static const char *const wires[] = {"fp32", "bf16", "fp16"};
    float *weights[3] = {NULL};
    size_t n[3] = {0};
    double accuracy[3] = {0};
    for (int k = 0; k < 3; k++) {
        char runs[KD_PATH_MAX + 32], runs_arg[KD_PATH_MAX + 64], name[32], wire[32];
        char dir[KD_PATH_MAX + 96], log[KD_PATH_MAX + 128];
        snprintf(runs, sizeof runs, "%s/runs", tmp);
        snprintf(runs_arg, sizeof runs_arg, "logging.runs_dir=%s", runs);
        snprintf(name, sizeof name, "name=wire_%s", wires[k]);
        snprintf(wire, sizeof wire, "cluster.wire=%s", wires[k]);
        snprintf(dir, sizeof dir, "%s/wire_%s", runs, wires[k]);
        char *argv[] = {kdist,
                        "run",
                        (char *)recipe,
                        name,
                        runs_arg,
                        wire,
                        "cluster.workers=1",
                        "cluster.shared_memory=false",
                        "data.train_subset=3000",
                        "data.val_size=500",
                        "data.test_subset=500",
                        NULL};
        int rc = run_argv(tmp, 300, argv);
        CHECK(rc == 0);
        if (rc != 0) fprintf(stderr, "kdist run %s said:\n%s\n", wire, out_buf);
        snprintf(log, sizeof log, "%s/logs/worker-0.log", dir);
        uint8_t *text = NULL;
        size_t len = 0;
        char said[64], err[KD_ERR_LEN];
        snprintf(said, sizeof said, "as %s (cluster.wire)", wires[k]);
        CHECK(kd_read_file(log, &text, &len, err, sizeof err) == 0 && strstr((char *)text, said));
        free(text);
        snprintf(log, sizeof log, "%s/summary.json", dir);
        json_t *s = json_load_file(log, 0, NULL);
        json_t *ledger = json_object_get(s, "ledger");
        CHECK(json_integer_value(json_object_get(ledger, "batches_applied")) == (2500 + 127) / 128);
        CHECK(json_integer_value(json_object_get(ledger, "batches_expected")) ==
              (2500 + 127) / 128);
        CHECK(json_integer_value(json_object_get(ledger, "gradients_rejected")) == 0);
        accuracy[k] = json_number_value(json_object_get(s, "test_accuracy"));
        json_decref(s);
        weights[k] = student_weights(dir, &n[k]);
        CHECK(weights[k] && n[k] == n[0] && n[k] > 0);
    }
    for (int k = 1; k < 3 && weights[0] && weights[k] && n[k] == n[0]; k++) {
        double diff = 0, norm = 0;
        size_t bf16_values = 0;
        for (size_t i = 0; i < n[0]; i++) {
            diff +=
                ((double)weights[k][i] - weights[0][i]) * ((double)weights[k][i] - weights[0][i]);
            norm += (double)weights[0][i] * weights[0][i];
            uint32_t bits;
            memcpy(&bits, &weights[k][i], sizeof bits);
            bf16_values += (bits & 0xffffu) == 0;
        }
        double rel = sqrt(diff / norm);
        fprintf(stderr,
                "test_run: cluster.wire=%s: weights %.2e of the fp32 run's norm apart, test "
                "accuracy %.3f (fp32 %.3f), %zu of %zu weights bf16 values\n",
                wires[k], rel, accuracy[k], accuracy[0], bf16_values, n[0]);
        CHECK(rel > 0 && rel < 0.05);
        CHECK(fabs(accuracy[k] - accuracy[0]) < 0.05);
        CHECK(bf16_values < n[0] / 10);
    }
    for (int k = 0; k < 3; k++) free(weights[k]);
}

/* A longer run in the background: `kdist status` shows its members; SIGINT (Ctrl-C) stops it,
 * and no process it started survives. */
static void test_status_and_stop(const char *tmp, const char *recipe) {
    char runs_arg[KD_PATH_MAX + 32], dir[KD_PATH_MAX + 32], out[KD_PATH_MAX + 32];
    snprintf(runs_arg, sizeof runs_arg, "logging.runs_dir=%s/runs", tmp);
    snprintf(dir, sizeof dir, "%s/runs/run_bg", tmp);
    snprintf(out, sizeof out, "%s/bg.txt", tmp);
    char *argv[] = {kdist,
                    "run",
                    (char *)recipe,
                    "name=run_bg",
                    runs_arg,
                    "train.epochs=200",
                    "data.train_subset=3000",
                    "data.val_size=500",
                    "data.test_subset=500",
                    NULL};
    pid_t pid = kd_test_start(out, argv);
    CHECK(pid > 0);
    if (pid <= 0) return;

    /* Poll until the coordinator answers with both workers and the teacher as members. */
    char *status_argv[] = {kdist, "status", dir, NULL};
    char *json_argv[] = {kdist, "status", dir, "--json", NULL};
    bool seen = false;
    double deadline = kd_now() + 90.0;
    while (!seen && kd_now() < deadline) {
        if (waitpid(pid, NULL, WNOHANG) == pid) {
            pid = -1;
            break;
        }
        if (run_argv(tmp, 10, json_argv) != 0) {
            usleep(100000);
            continue;
        }
        json_t *j = json_loads(out_buf, 0, NULL);
        int workers = 0, teachers = 0;
        size_t i;
        json_t *m;
        json_array_foreach(json_object_get(j, "members"), i, m) {
            const char *role = json_string_value(json_object_get(m, "role"));
            if (role && strcmp(role, "worker") == 0) workers++;
            if (role && strcmp(role, "teacher") == 0) teachers++;
        }
        json_decref(j);
        seen = workers == 2 && teachers == 1;
        if (!seen) usleep(100000);
    }
    CHECK(pid > 0); /* still running */
    CHECK(seen);
    if (seen) {
        CHECK(run_argv(tmp, 10, status_argv) == 0);
        CHECK_ERR_HAS(out_buf, "ROLE");
        CHECK_ERR_HAS(out_buf, "worker   0");
        CHECK_ERR_HAS(out_buf, "worker   1");
        CHECK_ERR_HAS(out_buf, "teacher  0");
        CHECK_ERR_HAS(out_buf, "join");
        CHECK_ERR_HAS(out_buf, "run_bg");
    }
    if (pid <= 0) return;

    char path[KD_PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/launcher.json", dir);
    json_t *launcher = json_load_file(path, 0, NULL);
    CHECK(json_array_size(json_object_get(launcher, "children")) == 4);

    kill(pid, SIGINT);
    int rc = kd_test_finish(pid, 60);
    kd_test_slurp(out, out_buf, sizeof out_buf);
    CHECK(rc == 1); /* stopped early is not success */
    CHECK_ERR_HAS(out_buf, "stopped");
    snprintf(path, sizeof path, "%s/summary.json", dir);
    json_t *s = json_load_file(path, 0, NULL);
    const char *status = json_string_value(json_object_get(s, "status"));
    CHECK(status && strcmp(status, "stopped") == 0);
    json_decref(s);

    /* Every child was reaped by kdist: none of their pids is alive (or a zombie) now. */
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(launcher, "children"), i, c) {
        pid_t child = (pid_t)json_integer_value(json_object_get(c, "pid"));
        CHECK(child > 0 && kill(child, 0) != 0 && errno == ESRCH);
    }
    json_decref(launcher);
}

/* Starts `kdist run` of the named run (dir and out set from its name) with extra overrides,
 * and waits until its coordinator counts `want` workers as members; returns the launcher's
 * pid (0 when it did not start) with *workers the last count seen. */
static pid_t start_run_with_workers(const char *tmp, const char *recipe, const char *name,
                                    const char *const *extra, int want, char *dir, char *out,
                                    size_t n, int *workers) {
    static char runs_arg[KD_PATH_MAX + 32], name_arg[128];
    snprintf(runs_arg, sizeof runs_arg, "logging.runs_dir=%s/runs", tmp);
    snprintf(name_arg, sizeof name_arg, "name=%s", name);
    snprintf(dir, n, "%s/runs/%s", tmp, name);
    snprintf(out, n, "%s/%s.txt", tmp, name);
    char *argv[32] = {kdist,
                      "run",
                      (char *)recipe,
                      name_arg,
                      runs_arg,
                      "data.train_subset=3000",
                      "data.val_size=500",
                      "data.test_subset=500"};
    int argc = 8;
    for (int i = 0; extra[i] && argc < 31; i++) argv[argc++] = (char *)extra[i];
    pid_t pid = kd_test_start(out, argv);
    CHECK(pid > 0);
    *workers = 0;
    if (pid <= 0) return 0;
    double deadline = kd_now() + 90.0;
    while (*workers < want && kd_now() < deadline && waitpid(pid, NULL, WNOHANG) == 0) {
        char log[KD_PATH_MAX + 32];
        snprintf(log, sizeof log, "%s/out.txt", tmp);
        *workers = kd_test_status_members(kdist, dir, "worker", log, out_buf, sizeof out_buf);
        if (*workers < want) usleep(50000);
    }
    CHECK(*workers == want);
    return pid;
}

/* Three sync workers, one SIGKILLed once all three train, no restart: the run completes with
 * its ledger whole, so `kdist run` exits 0 (a script's `kdist run && publish` keeps a good
 * model), and the table and summary.json name the worker that died. Paced by events: the kill
 * follows the status that shows three workers, and a sync step waits for the dead worker
 * until the coordinator declares it dead, so the run cannot end before that is seen. */
static void test_worker_killed(const char *tmp, const char *recipe) {
    char dir[KD_PATH_MAX + 64], out[KD_PATH_MAX + 64];
    const char *extra[] = {"cluster.workers=3",        "cluster.consistency=sync",
                           "cluster.heartbeat_ms=100", "cluster.heartbeat_timeout_ms=1500",
                           "train.epochs=20",          NULL};
    int workers;
    pid_t pid =
        start_run_with_workers(tmp, recipe, "run_killed", extra, 3, dir, out, sizeof dir, &workers);
    if (!pid) return;
    pid_t victim = kd_test_launcher_pid(dir, "worker", 2);
    CHECK(victim > 0);
    if (victim > 0 && workers == 3) kill(victim, SIGKILL);
    int rc = kd_test_finish(pid, 120);
    kd_test_slurp(out, out_buf, sizeof out_buf);
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "kdist run said:\n%s\n", out_buf);
    CHECK_ERR_HAS(out_buf, "worker 2 failed: killed by signal 9");
    CHECK_ERR_HAS(out_buf, "lost                 worker 2 (died");
    CHECK_ERR_HAS(out_buf, "the run completed without the process that failed");

    char path[KD_PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    json_t *s = json_load_file(path, 0, NULL);
    const char *status = json_string_value(json_object_get(s, "status"));
    CHECK(status && strcmp(status, "completed") == 0);
    json_t *ledger = json_object_get(s, "ledger");
    json_int_t expected = json_integer_value(json_object_get(ledger, "batches_expected"));
    CHECK(expected == 20 * ((2500 + 127) / 128));
    CHECK(json_integer_value(json_object_get(ledger, "batches_applied")) == expected);
    json_t *lost = json_object_get(s, "members_lost");
    CHECK(json_array_size(lost) == 1);
    const char *id = json_string_value(json_object_get(json_array_get(lost, 0), "id"));
    CHECK(id && strcmp(id, "2") == 0);
    json_decref(s);
}

/* A run whose coordinator is SIGKILLed (no restart) does not complete: `kdist run` exits
 * non-zero and says why. The run is far longer than the test: it ends by the kill. */
static void test_coordinator_killed(const char *tmp, const char *recipe) {
    char dir[KD_PATH_MAX + 64], out[KD_PATH_MAX + 64];
    const char *extra[] = {"train.epochs=100000", NULL};
    int workers;
    pid_t pid = start_run_with_workers(tmp, recipe, "run_coord_killed", extra, 2, dir, out,
                                       sizeof dir, &workers);
    if (!pid) return;
    pid_t coordinator = kd_test_launcher_pid(dir, "coordinator", 0);
    CHECK(coordinator > 0);
    if (coordinator > 0) kill(coordinator, SIGKILL);
    int rc = kd_test_finish(pid, 120);
    kd_test_slurp(out, out_buf, sizeof out_buf);
    CHECK(rc == 1);
    CHECK_ERR_HAS(out_buf, "coordinator 0 failed: killed by signal 9");
}

/* Whether the safetensors file at dir/name is absent or holds finite float tensors only. */
static bool absent_or_finite(const char *dir, const char *name) {
    char path[KD_PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (!kd_file_exists(path)) return true;
    kd_safetensors_t *f = NULL;
    char err[KD_ERR_LEN];
    if (kd_st_open(path, &f, err, sizeof err) != 0) return false;
    bool finite = true;
    for (int i = 0; i < kd_st_count(f) && finite; i++) {
        const kd_st_tensor_t *t = kd_st_tensor(f, i);
        if (t->dtype != KD_DTYPE_F32) continue;
        size_t n = t->nbytes / sizeof(float);
        float *v = kd_xmalloc(t->nbytes + 1);
        memcpy(v, kd_st_data(f, t), t->nbytes); /* the data need not be aligned */
        finite = kd_first_nonfinite(v, n) == n;
        free(v);
    }
    kd_st_close(&f);
    return finite;
}

/* A run that diverges (optim.lr=1e6) ends by itself, "failed" with the cause named, in bounded
 * time (its length, 100000 epochs, would take days): exit 1, a valid summary.json, and no
 * non-finite weights saved as final, best or checkpoint. */
static void test_diverges(const char *tmp, const char *recipe) {
    char runs_arg[KD_PATH_MAX + 32], dir[KD_PATH_MAX + 64];
    snprintf(runs_arg, sizeof runs_arg, "logging.runs_dir=%s/runs", tmp);
    snprintf(dir, sizeof dir, "%s/runs/run_diverges", tmp);
    char *argv[] = {kdist,
                    "run",
                    (char *)recipe,
                    "name=run_diverges",
                    runs_arg,
                    "optim.lr=1e6",
                    "train.epochs=100000",
                    "eval.every_steps=5",
                    "checkpoint.every_steps=5",
                    "data.train_subset=3000",
                    "data.val_size=500",
                    "data.test_subset=500",
                    NULL};
    double t0 = kd_now();
    int rc = run_argv(tmp, 300, argv);
    fprintf(stderr, "a diverging run ended after %.1f s with exit code %d\n", kd_now() - t0, rc);
    CHECK(rc == 1);
    CHECK_ERR_HAS(out_buf, "status               failed");
    CHECK_ERR_HAS(out_buf, "optim.lr");
    char path[KD_PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    json_error_t jerr;
    json_t *s = json_load_file(path, 0, &jerr);
    CHECK(json_is_object(s));
    if (!s) fprintf(stderr, "%s: %s\n", path, jerr.text);
    const char *status = json_string_value(json_object_get(s, "status"));
    const char *error = json_string_value(json_object_get(s, "error"));
    CHECK(status && strcmp(status, "failed") == 0);
    CHECK(error && strstr(error, "optim.lr"));
    json_decref(s);
    CHECK(absent_or_finite(dir, "student.safetensors"));
    CHECK(absent_or_finite(dir, "best/student.safetensors"));
    char ckpt_dir[KD_PATH_MAX + 128];
    snprintf(ckpt_dir, sizeof ckpt_dir, "%s/checkpoints", dir);
    glob_t g;
    char pattern[KD_PATH_MAX + 160];
    snprintf(pattern, sizeof pattern, "%s/*.safetensors", ckpt_dir);
    if (glob(pattern, 0, NULL, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; i++) {
            bool ok = absent_or_finite(ckpt_dir, strrchr(g.gl_pathv[i], '/') + 1);
            CHECK(ok);
            if (!ok) fprintf(stderr, "non-finite checkpoint %s\n", g.gl_pathv[i]);
        }
        globfree(&g);
    }
}

/* A number from /proc/<pid>/status ("VmRSS", "VmHWM"), in bytes; -1 if unreadable. */
static long proc_status_bytes(pid_t pid, const char *field) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    long kb = -1;
    size_t n = strlen(field);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, field, n) == 0 && line[n] == ':') kb = strtol(line + n + 1, NULL, 10);
    if (f) fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

/* The coordinator's status: its step and how many evaluations it logged; false if it does not
 * answer. */
static bool run_progress(const char *tmp, const char *dir, long *step, long *evals) {
    char *json_argv[] = {kdist, "status", (char *)dir, "--json", NULL};
    if (run_argv(tmp, 10, json_argv) != 0) return false;
    json_t *j = json_loads(out_buf, 0, NULL);
    *step = (long)json_integer_value(json_object_get(j, "step"));
    json_decref(j);
    char log[KD_PATH_MAX + 1200];
    snprintf(log, sizeof log, "%s/logs/coordinator-0.log", dir);
    uint8_t *text = NULL;
    size_t len = 0;
    char err[KD_ERR_LEN];
    *evals = 0;
    if (kd_read_file(log, &text, &len, err, sizeof err) == 0)
        for (const char *p = (char *)text; (p = strstr(p, "COORD-EVAL step")); p++) (*evals)++;
    free(text);
    return true;
}

/* eval.every_steps=1 on a model whose evaluation takes far longer than a step (the 800-800
 * MLP, 1.3M parameters, 7000 evaluation samples): at most one snapshot waits, so the
 * coordinator's memory stays flat while hundreds of steps each ask for an evaluation (an
 * unbounded queue grew by 5 MB a step), and Ctrl-C ends the run without working through a
 * backlog. Paced by events: steps and evaluations seen in status and log. */
static void test_eval_bounded(const char *tmp) {
    char dir[KD_PATH_MAX + 64], out[KD_PATH_MAX + 64];
    const char *extra[] = {"eval.every_steps=1",
                           "train.epochs=100000",
                           "data.val_size=5000",
                           "data.test_subset=10000",
                           "data.train_subset=11000",
                           "cluster.workers=2",
                           NULL};
    int workers;
    pid_t pid = start_run_with_workers(tmp, "../recipes/fashion_mlp_student.yaml", "run_eval",
                                       extra, 2, dir, out, sizeof dir, &workers);
    if (!pid) return;
    pid_t coordinator = kd_test_launcher_pid(dir, "coordinator", 0);
    CHECK(coordinator > 0);
    long step = 0, evals = 0, base_step = -1, base_evals = 0, base_rss = -1, hwm = -1;
    double deadline = kd_now() + 120.0;
    while (kd_now() < deadline && waitpid(pid, NULL, WNOHANG) == 0) {
        if (!run_progress(tmp, dir, &step, &evals)) continue;
        if (base_rss < 0 && evals >= 2) { /* evaluator and snapshot allocated */
            base_rss = proc_status_bytes(coordinator, "VmRSS");
            base_step = step;
            base_evals = evals;
        }
        if (base_rss >= 0 && step >= base_step + 300 && evals >= base_evals + 2) {
            hwm = proc_status_bytes(coordinator, "VmHWM");
            break;
        }
        usleep(100000);
    }
    fprintf(stderr,
            "eval.every_steps=1: %ld steps and %ld evaluations after step %ld; coordinator RSS "
            "%.0f MB then, peak %.0f MB\n",
            step - base_step, evals - base_evals, base_step, base_rss / 1e6, hwm / 1e6);
    CHECK(base_rss > 0 && hwm > 0);
    CHECK(hwm - base_rss < 100L << 20); /* unbounded: ~5 MB more per step, 1.5 GB here */
    CHECK(evals < step - base_step);    /* evaluations really were skipped */
    double t0 = kd_now();
    kill(pid, SIGINT);
    int rc = kd_test_finish(pid, 120);
    fprintf(stderr, "stopped in %.1f s\n", kd_now() - t0);
    CHECK(rc == 1); /* stopped is not completed */
    CHECK(kd_now() - t0 < 60.0);
}

static void test_errors(const char *tmp) {
    char bad[KD_PATH_MAX + 32];
    snprintf(bad, sizeof bad, "%s/bad.yaml", tmp);
    kd_test_write_text(bad, "name: bad\ntrain:\n  epoch: 3\n");
    char *argv[] = {kdist, "run", bad, NULL};
    CHECK(run_argv(tmp, 30, argv) == 2);
    CHECK_ERR_HAS(out_buf, "bad.yaml:3:3:");
    CHECK_ERR_HAS(out_buf, "epochs");

    char *no_recipe[] = {kdist, "run", NULL};
    CHECK(run_argv(tmp, 30, no_recipe) == 2);
    char *bad_override[] = {kdist, "run", "../recipes/fashion_mlp_student.yaml",
                            "cluster.workerz=2", NULL};
    CHECK(run_argv(tmp, 30, bad_override) == 2);
    CHECK_ERR_HAS(out_buf, "cluster.workerz");
    /* A hold no cluster kdist run starts can satisfy: refused before anything starts. */
    char *never_begins[] = {kdist,
                            "run",
                            "../recipes/fashion_mlp_student.yaml",
                            "cluster.teachers=1",
                            "cluster.start_teachers=2",
                            NULL};
    CHECK(run_argv(tmp, 30, never_begins) == 2);
    CHECK_ERR_HAS(out_buf, "cluster.start_teachers 2 is more than the 1 teacher nodes");

    /* Nobody listens there: status says so, naming the endpoint, within its deadline. */
    char *status[] = {kdist, "status", "tcp://127.0.0.1:9", NULL};
    double t0 = kd_now();
    CHECK(run_argv(tmp, 30, status) == 1);
    CHECK(kd_now() - t0 < 10.0);
    CHECK_ERR_HAS(out_buf, "tcp://127.0.0.1:9");
    CHECK_ERR_HAS(out_buf, "did not answer");
}

int main(void) {
    snprintf(kdist, sizeof kdist, "%s", kd_test_bin("kdist"));
    const char *tmp = kd_test_tmpdir("test_run");
    char recipe[KD_PATH_MAX + 32];
    snprintf(recipe, sizeof recipe, "%s/small.yaml", tmp);
    kd_test_write_text(recipe, recipe_text);

    test_errors(tmp);
    test_run_completes(tmp, recipe);
    test_wire_formats(tmp, recipe);
    test_status_and_stop(tmp, recipe);
    test_worker_killed(tmp, recipe);
    test_coordinator_killed(tmp, recipe);
    test_diverges(tmp, recipe);
    test_eval_bounded(tmp);
    return kd_test_done("test_run");
}
