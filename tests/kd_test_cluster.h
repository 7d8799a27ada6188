/* kd_test_cluster: starting kdist's real processes from a test and waiting for them with a
 * deadline (polling for the event, never sleeping a fixed time). Header-only for tests. */
#ifndef KD_TEST_CLUSTER_H
#define KD_TEST_CLUSTER_H

#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kd_util.h"

extern char **environ;

static inline double kd_test_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Path of a kdist binary: $KD_BIN_DIR/name (ctest sets it), else ../build/bin/name. */
static inline const char *kd_test_bin(const char *name) {
    static char paths[8][1024];
    static int next = 0;
    char *p = paths[next++ % 8];
    const char *dir = getenv("KD_BIN_DIR");
    snprintf(p, 1024, "%s/%s", dir ? dir : "../build/bin", name);
    return p;
}

/* Starts argv (NULL-terminated) with stdout and stderr appended to log_path. */
static inline pid_t kd_test_spawn(char *const argv[], const char *log_path) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, log_path, O_WRONLY | O_CREAT | O_APPEND,
                                     0644);
    posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
    pid_t pid = -1;
    if (posix_spawn(&pid, argv[0], &fa, NULL, argv, environ) != 0) pid = -1;
    posix_spawn_file_actions_destroy(&fa);
    return pid;
}

/* Waits for pid until the deadline (seconds from now). Returns the exit code, 128+signal for
 * a signal, or -1 on timeout (the process is then killed with SIGKILL and reaped). */
static inline int kd_test_wait(pid_t pid, double seconds) {
    double deadline = kd_test_now() + seconds;
    int status;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) break;
        if (r < 0) return -1;
        if (kd_test_now() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        struct timespec tick = {0, 10 * 1000 * 1000}; /* poll the exit every 10 ms */
        nanosleep(&tick, NULL);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* Waits until path exists (a process announces readiness by writing it). */
static inline bool kd_test_wait_file(const char *path, double seconds) {
    double deadline = kd_test_now() + seconds;
    while (access(path, F_OK) != 0) {
        if (kd_test_now() > deadline) return false;
        struct timespec tick = {0, 10 * 1000 * 1000};
        nanosleep(&tick, NULL);
    }
    return true;
}

/* Reads a whole small text file into buf (NUL-terminated); false if unreadable. */
static inline bool kd_test_read_text(const char *path, char *buf, size_t len) {
    FILE *f = fopen(path, "r");
    if (!f) return false;
    size_t n = fread(buf, 1, len - 1, f);
    buf[n] = 0;
    fclose(f);
    return true;
}

/* Prints the last lines of a log, for a failing test's output. */
static inline void kd_test_show_log(const char *path) {
    char cmd[8192];
    if (snprintf(cmd, sizeof cmd, "echo '--- %s'; tail -n 15 '%s'", path, path) >= (int)sizeof cmd)
        return;
    if (system(cmd) != 0) fprintf(stderr, "(cannot show %s)\n", path);
}

/* Starts argv[] (a fresh file: truncated) with stdout+stderr into out_path; returns the pid (or
 * -1). */
static inline pid_t kd_test_start(const char *out_path, char *const argv[]) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, out_path, O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
        fprintf(stderr, "cannot start %s: %s\n", argv[0], strerror(rc));
        return -1;
    }
    return pid;
}

/* Waits for pid until the deadline (seconds); on expiry stops it (SIGTERM, then SIGKILL after
 * 40 s) and returns -1. Else the exit code (128 + signal when killed by one). */
static inline int kd_test_finish(pid_t pid, double seconds) {
    double deadline = kd_test_now() + seconds;
    for (;;) {
        int st;
        pid_t p = waitpid(pid, &st, WNOHANG);
        if (p == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (p < 0) return -1;
        if (kd_test_now() > deadline) {
            fprintf(stderr, "pid %d still running after %.0f s: killing it\n", (int)pid, seconds);
            kill(pid, SIGTERM); /* kdist forwards this as STOP, then its deadlines apply */
            double hard = kd_test_now() + 40.0;
            while (waitpid(pid, &st, WNOHANG) == 0 && kd_test_now() < hard) usleep(20000);
            if (kd_test_now() >= hard) {
                kill(pid, SIGKILL);
                waitpid(pid, &st, 0);
            }
            return -1;
        }
        usleep(20000);
    }
}

/* Reads a whole small text file into buf like kd_test_read_text, leaving buf empty when the file
 * cannot be read (a process that wrote nothing). */
static inline void kd_test_slurp(const char *path, char *buf, size_t len) {
    if (!kd_test_read_text(path, buf, len)) buf[0] = 0;
}

/* Writes a test's input file (a recipe, a planted endpoint); a test cannot go on without it. */
static inline void kd_test_write_text(const char *path, const char *text) {
    char err[KD_ERR_LEN];
    if (kd_write_file_atomic(path, text, strlen(text), err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
}

/* Whether two files hold the same bytes (weights two runs wrote). */
static inline bool kd_test_same_file(const char *a, const char *b) {
    uint8_t *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    char err[KD_ERR_LEN];
    bool same = kd_read_file(a, &x, &nx, err, sizeof err) == 0 &&
                kd_read_file(b, &y, &ny, err, sizeof err) == 0 && nx == ny && memcmp(x, y, nx) == 0;
    free(x);
    free(y);
    return same;
}

/* Whether dir/name exists (an output of a run, a file a process wrote). */
static inline bool kd_test_exists_in(const char *dir, const char *name) {
    char path[KD_PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return kd_file_exists(path);
}

/* Runs argv to completion with its stdout and stderr in log (emptied first), then in buf.
 * Returns the exit code; -1 when it cannot start (buf untouched) or passes the deadline
 * (seconds), where kd_test_wait kills it. */
static inline int kd_test_capture_wait(char *const argv[], const char *log, double seconds,
                                       char *buf, size_t len) {
    remove(log); /* kd_test_spawn appends */
    pid_t pid = kd_test_spawn(argv, log);
    if (pid < 0) return -1;
    int rc = kd_test_wait(pid, seconds);
    kd_test_slurp(log, buf, len);
    return rc;
}

/* kd_test_capture_wait for a process that should stop cleanly: past the deadline kd_test_finish
 * sends SIGTERM first (kdist then stops what it started), SIGKILL only later. */
static inline int kd_test_capture_finish(char *const argv[], const char *log, double seconds,
                                         char *buf, size_t len) {
    pid_t pid = kd_test_start(log, argv);
    if (pid < 0) return -1;
    int rc = kd_test_finish(pid, seconds);
    kd_test_slurp(log, buf, len);
    return rc;
}

/* ---- argv of kdist's processes, for tests that start a cluster node by node ------------------ */

/* `kdist-coordinator --recipe R --run-dir D` into argv; returns the count so far (overrides may
 * follow; see kd_test_add_overrides, which ends argv). */
static inline int kd_test_coordinator_argv(char **argv, const char *recipe, const char *run_dir) {
    int argc = 0;
    argv[argc++] = (char *)kd_test_bin("kdist-coordinator");
    argv[argc++] = "--recipe";
    argv[argc++] = (char *)recipe;
    argv[argc++] = "--run-dir";
    argv[argc++] = (char *)run_dir;
    return argc;
}

/* `kdist-teacher --coordinator EP --id ID --recipe R` into argv; returns the count so far. */
static inline int kd_test_teacher_argv(char **argv, const char *endpoint, const char *id,
                                       const char *recipe) {
    int argc = 0;
    argv[argc++] = (char *)kd_test_bin("kdist-teacher");
    argv[argc++] = "--coordinator";
    argv[argc++] = (char *)endpoint;
    argv[argc++] = "--id";
    argv[argc++] = (char *)id;
    argv[argc++] = "--recipe";
    argv[argc++] = (char *)recipe;
    return argc;
}

/* Keeps the first (at most max) of a NULL-terminated override list (NULL: none); returns how
 * many. */
static inline int kd_test_take_overrides(const char **kept, int max, const char *const *overrides) {
    int n = 0;
    for (; overrides && overrides[n] && n < max; n++) kept[n] = overrides[n];
    return n;
}

/* Appends name_arg and the n overrides at argv[argc], then the NULL; returns the new count.
 * Every process of a run gets the same ones, so they all agree on the recipe. */
static inline int kd_test_add_overrides(char **argv, int argc, const char *name_arg,
                                        const char *const *overrides, int n) {
    argv[argc++] = (char *)name_arg;
    for (int i = 0; i < n; i++) argv[argc++] = (char *)overrides[i];
    argv[argc] = NULL;
    return argc;
}

/* Creates path and its parents (a run's logs directory); false, with the reason printed, if not. */
static inline bool kd_test_make_dirs(const char *path) {
    char err[KD_ERR_LEN];
    if (kd_mkdirs(path, err, sizeof err) == 0) return true;
    fprintf(stderr, "%s\n", err);
    return false;
}

/* ---- a `kdist run` from outside ------------------------------------------------------------- */

/* The pid of the launcher's child (role "worker", "teacher" or "coordinator", and id) from
 * <run dir>/launcher.json; 0 when it is not there (yet). */
static inline pid_t kd_test_launcher_pid(const char *dir, const char *role, int id) {
    char path[KD_PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/launcher.json", dir);
    json_t *launcher = json_load_file(path, 0, NULL), *c;
    pid_t pid = 0;
    size_t i;
    json_array_foreach(json_object_get(launcher, "children"), i, c) {
        const char *r = json_string_value(json_object_get(c, "role"));
        if (r && strcmp(r, role) == 0 && json_integer_value(json_object_get(c, "id")) == id)
            pid = (pid_t)json_integer_value(json_object_get(c, "pid"));
    }
    json_decref(launcher);
    return pid;
}

/* How many members of a role ("worker", "teacher") `kdist status DIR --json` counts; -1 when
 * the coordinator does not answer. log is the status command's output file, buf its text. */
static inline int kd_test_status_members(const char *kdist, const char *dir, const char *role,
                                         const char *log, char *buf, size_t len) {
    char *argv[] = {(char *)kdist, "status", (char *)dir, "--json", NULL};
    if (kd_test_capture_finish(argv, log, 10, buf, len) != 0) return -1;
    json_t *j = json_loads(buf, 0, NULL), *m;
    int n = 0;
    size_t i;
    json_array_foreach(json_object_get(j, "members"), i, m) {
        const char *r = json_string_value(json_object_get(m, "role"));
        if (r && strcmp(r, role) == 0) n++;
    }
    json_decref(j);
    return n;
}

#endif
