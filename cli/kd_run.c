/* kdist run's launcher: one run of one recipe on a local cluster. Starts the coordinator, the
 * teacher nodes and the workers as child processes (logs in <run>/logs/), shows progress from
 * the coordinator's StatusReply, turns Ctrl-C into Control{STOP}, reaps every child within
 * deadlines, prints the summary. It also serves `kdist scale` (more workers, or drain the
 * surplus) on a control socket, and restarts crashed children when the recipe says
 * cluster.restart_failed. kd_pipeline.c chains such runs (teacher first, baseline).
 * Single-threaded. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <glob.h>
#include <jansson.h>
#include <libgen.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kd_cli.h"
#include "kd_curve.h"
#include "kd_recipe.h"
#include "kd_util.h"

#define RUN_MAX_ARGS      (CLI_RUN_MAX_OVERRIDES + 16)
#define ENDPOINT_DEADLINE 30.0 /* seconds for the coordinator to bind */
#define ENDPOINT_POLL_MS  20
#define STATUS_EVERY      0.5  /* seconds between Control{STATUS} */
#define STATUS_RETRY      2.0  /* a STATUS unanswered this long is sent again */
#define STOP_DEADLINE     30.0 /* after Ctrl-C: every child must be gone by then */
#define DRAIN_DEADLINE    15.0 /* after the coordinator exits: the others must follow */
#define TERM_DEADLINE     5.0  /* after SIGTERM, before SIGKILL */
#define KILL_DEADLINE     5.0
#define LOG_LINES_EVERY   10.0 /* progress lines when stderr is not a terminal */
#define TAIL_LINES        10
#define RESTART_LIMIT     5    /* restarts per child: a crash loop (bad binary, bad data) ends */
#define DRAIN_RESEND      2.0  /* DRAIN again: the first may have beaten the worker's Hello */
#define DRAIN_GRACE       30.0 /* a drained worker still running this long gets SIGTERM */
#define SCALE_MAX_WORKERS 1024 /* cluster.workers' own bound */
#define CONTROL_MAX_BYTES 4096 /* a `kdist scale` request is a small Control message */

typedef struct {
    const char *role; /* "coordinator" | "teacher" | "worker" */
    int id;
    pid_t pid;
    char log[KD_PATH_MAX + 64];
    bool exited;
    int wstatus;
    int killed_with; /* the last signal kdist sent it, 0 if none */
    int restarts;    /* times it was restarted after a crash (cluster.restart_failed) */
    bool crashed;    /* died while the run was going and was not restarted: a failure */
    bool draining;   /* `kdist scale` drained it: its exit is expected, never restarted */
    double drain_since, drain_sent;
} run_child_t;

typedef struct {
    const char *recipe_path;
    const char *const *overrides; /* the caller's (cli_run_spec_t), valid for the whole run */
    int n_overrides;
    bool resume;
    kd_recipe_t recipe;
    char dir[KD_PATH_MAX];
    char bin_dir[KD_PATH_MAX];
    char endpoint[KD_PATH_MAX];
    char coord_control[KD_PATH_MAX + 64]; /* the coordinator's control channel (ipc://) */
    run_child_t *children; /* [0] is the coordinator; the array grows when workers are added */
    int n_children, cap_children;
    int next_worker_id; /* scaled-up workers get fresh ids: logs and membership never mix */
    cli_client_t *client;
    void *control_ctx, *control; /* the REP socket `kdist scale` talks to */
    char control_endpoint[KD_PATH_MAX + 16];
    char control_tmpdir[64]; /* a private directory of ours for it, removed at the end */
    /* cluster.security.curve: every role's pair from keys_dir (made absolute); the client's
     * for this process's own control client */
    bool curve;
    char keys_dir[KD_PATH_MAX];
    kd_curve_client_t client_curve;
    const char *stop_reason; /* set when the run cannot go on: supervise stops it */
    pid_t self;
    bool tty;
    bool line_shown; /* a \r progress line is on the terminal */
    bool running;    /* the coordinator is up and nobody asked to stop: deaths are news */
} run_t;

static volatile sig_atomic_t run_signals = 0;

static void on_signal(int sig) {
    (void)sig;
    run_signals++;
}

static void install_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    /* no SA_RESTART: zmq_poll and poll must return EINTR so the loop sees the signal */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

void cli_vnote(const char *fmt, va_list ap) {
    fputs("kdist run: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    fflush(stderr);
}

/* Messages go to stderr below any live progress line, which is cleared first. */
static void say(run_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(run_t *r, const char *fmt, ...) {
    if (r->line_shown) fputs("\r\033[K", stderr);
    r->line_shown = false;
    va_list ap;
    va_start(ap, fmt);
    cli_vnote(fmt, ap);
    va_end(ap);
}

static void describe_wstatus(int st, char *out, size_t n) {
    if (WIFEXITED(st))
        snprintf(out, n, "exit status %d", WEXITSTATUS(st));
    else if (WIFSIGNALED(st))
        snprintf(out, n, "killed by signal %d (%s)", WTERMSIG(st), strsignal(WTERMSIG(st)));
    else
        snprintf(out, n, "wait status %#x", st);
}

static bool child_ok(const run_child_t *c) {
    return c->exited && WIFEXITED(c->wstatus) && WEXITSTATUS(c->wstatus) == 0;
}

/* The last n lines of a log, indented (reads at most its last 64 KiB). */
static void print_log_tail(const char *path, int n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "    (cannot open %s: %s)\n", path, strerror(errno));
        return;
    }
    static char buf[65536];
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    long start = size > (long)sizeof buf - 1 ? size - (long)sizeof buf + 1 : 0;
    fseek(f, start, SEEK_SET);
    size_t len = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    while (len > 0 && buf[len - 1] == '\n') len--;
    buf[len] = 0;
    if (len == 0) {
        fprintf(stderr, "    (%s is empty)\n", path);
        return;
    }
    size_t pos = len;
    int lines = 0;
    while (pos > 0 && lines < n) {
        pos--;
        if (buf[pos] == '\n') lines++;
    }
    if (buf[pos] == '\n') pos++;
    fprintf(stderr, "    --- last lines of %s ---\n", path);
    for (char *line = buf + pos, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        fprintf(stderr, "    %s\n", line);
    }
}

/* ---- run directory ----------------------------------------------------------------------- */

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

static int remove_path(const char *dir, const char *name, bool tree, char *err, size_t errlen) {
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int rc = tree ? nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS) : remove(path);
    if (rc != 0 && errno != ENOENT)
        return kd_err(err, errlen, "cannot remove %s: %s", path, strerror(errno));
    return 0;
}

/* Creates DIR and DIR/logs. A fresh run removes the outputs of an earlier one so nothing of it
 * mixes into this run; --resume keeps checkpoints/ and the metrics. A stale endpoint always
 * goes: it would make us (and `kdist status`) talk to a dead port. */
static int prepare_run_dir(run_t *r, char *err, size_t errlen) {
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/logs", r->dir);
    if (kd_mkdirs(path, err, errlen) != 0) return -1;
    if (remove_path(r->dir, "coordinator.endpoint", false, err, errlen) != 0) return -1;
    if (remove_path(r->dir, "summary.json", false, err, errlen) != 0) return -1;
    if (remove_path(r->dir, "comparison.json", false, err, errlen) != 0) return -1;
    if (r->resume) return 0;
    if (remove_path(r->dir, "student.safetensors", false, err, errlen) != 0) return -1;
    if (remove_path(r->dir, "metrics.jsonl", false, err, errlen) != 0) return -1;
    if (remove_path(r->dir, "checkpoints", true, err, errlen) != 0) return -1;
    snprintf(path, sizeof path, "%s/events.out.tfevents.*", r->dir);
    glob_t g;
    if (glob(path, 0, NULL, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; i++)
            if (remove(g.gl_pathv[i]) != 0 && errno != ENOENT) {
                kd_err(err, errlen, "cannot remove %s: %s", g.gl_pathv[i], strerror(errno));
                globfree(&g);
                return -1;
            }
        globfree(&g);
    }
    return 0;
}

static int find_binaries(run_t *r, char *err, size_t errlen) {
    char exe[KD_PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) return kd_err(err, errlen, "cannot read /proc/self/exe: %s", strerror(errno));
    exe[n] = 0;
    snprintf(r->bin_dir, sizeof r->bin_dir, "%s", dirname(exe));
    const char *need[] = {"kdist-coordinator", "kdist-teacher", "kdist-worker"};
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++) {
        char path[KD_PATH_MAX + 64];
        snprintf(path, sizeof path, "%s/%s", r->bin_dir, need[i]);
        if (access(path, X_OK) != 0)
            return kd_err(err, errlen, "%s is missing (it must sit beside kdist): %s", path,
                          strerror(errno));
    }
    return 0;
}

/* launcher.json: who runs where, for `kdist scale` and for people. */
static void write_launcher_json(run_t *r) {
    json_t *kids = json_array();
    for (int i = 0; i < r->n_children; i++) {
        run_child_t *c = &r->children[i];
        if (!c->pid) continue;
        const char *state = c->exited ? "exited" : c->draining ? "draining" : "running";
        json_t *o = json_pack("{s:s, s:i, s:i, s:s, s:s, s:i}", "role", c->role, "id", c->id, "pid",
                              (int)c->pid, "log", c->log, "state", state, "restarts", c->restarts);
        if (c->exited) {
            char how[96];
            describe_wstatus(c->wstatus, how, sizeof how);
            json_object_set_new(o, "exit", json_string(how));
        }
        json_array_append_new(kids, o);
    }
    json_t *overrides = json_array();
    for (int i = 0; i < r->n_overrides; i++)
        json_array_append_new(overrides, json_string(r->overrides[i]));
    json_t *root =
        json_pack("{s:i, s:s, s:s, s:s, s:o, s:s, s:s, s:o}", "launcher_pid", (int)r->self,
                  "run_dir", r->dir, "recipe", r->recipe_path, "bin_dir", r->bin_dir, "overrides",
                  overrides, "coordinator_endpoint", r->endpoint, "control_endpoint",
                  r->control_endpoint, "children", kids);
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(root);
    char path[KD_PATH_MAX + 64], err[KD_ERR_LEN];
    snprintf(path, sizeof path, "%s/launcher.json", r->dir);
    if (!text || kd_write_file_atomic(path, text, strlen(text), err, sizeof err) != 0)
        say(r, "warning: %s", text ? err : "cannot encode launcher.json");
    free(text);
}

/* ---- children ---------------------------------------------------------------------------- */

/* The returned pointer, like every pointer into r->children, lives until the next add_child. */
static run_child_t *add_child(run_t *r, const char *role, int id) {
    if (r->n_children == r->cap_children) {
        int cap = r->cap_children ? 2 * r->cap_children : 8;
        run_child_t *grown = kd_xcalloc((size_t)cap, sizeof *grown);
        if (r->n_children) memcpy(grown, r->children, sizeof *grown * (size_t)r->n_children);
        free(r->children);
        r->children = grown;
        r->cap_children = cap;
    }
    run_child_t *c = &r->children[r->n_children++];
    memset(c, 0, sizeof *c);
    c->role = role;
    c->id = id;
    snprintf(c->log, sizeof c->log, "%s/logs/%s-%d.log", r->dir, role, id);
    return c;
}

/* fork + exec with stdout/stderr in the child's log. The child dies with us (PDEATHSIG). A
 * restart appends to the log, below a line that says why, so the crash stays readable. */
static int spawn(run_t *r, run_child_t *c, char *const argv[], const char *restart_why, char *err,
                 size_t errlen) {
    bool append = r->resume || restart_why;
    int fd = open(c->log, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0644);
    if (fd < 0) return kd_err(err, errlen, "cannot open %s: %s", c->log, strerror(errno));
    if (restart_why)
        dprintf(fd, "----- kdist run: %s %d crashed (%s); restart %d -----\n", c->role, c->id,
                restart_why, c->restarts);
    fflush(NULL); /* nothing buffered may be written twice */
    pid_t pid = fork();
    if (pid < 0) {
        close(fd);
        return kd_err(err, errlen, "cannot start %s %d: fork: %s", c->role, c->id, strerror(errno));
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != r->self) _exit(127); /* we died before prctl took effect */
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        int nul = open("/dev/null", O_RDONLY);
        if (nul >= 0) dup2(nul, STDIN_FILENO);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        execv(argv[0], argv);
        dprintf(STDERR_FILENO, "kdist run: cannot execute %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(fd);
    c->pid = pid;
    return 0;
}

/* Argument vector builder: strings live in the builder until the spawn. */
typedef struct {
    char *argv[RUN_MAX_ARGS + 1];
    char store[RUN_MAX_ARGS][KD_PATH_MAX + 64];
    int n;
} run_args_t;

static void arg(run_args_t *a, const char *s) {
    KD_ASSERT(a->n < RUN_MAX_ARGS);
    KD_ASSERT(strlen(s) < sizeof a->store[0]); /* paths are bounded by KD_PATH_MAX upstream */
    memcpy(a->store[a->n], s, strlen(s) + 1);
    a->argv[a->n] = a->store[a->n];
    a->argv[++a->n] = NULL;
}

static void arg_overrides(run_args_t *a, const run_t *r) {
    for (int i = 0; i < r->n_overrides; i++) arg(a, r->overrides[i]);
}

static void bin(run_args_t *a, const run_t *r, const char *name) {
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", r->bin_dir, name);
    arg(a, path);
}

/* Under CurveZMQ: option FILE with FILE = keys_dir/name. */
static void arg_key(run_args_t *a, const run_t *r, const char *option, const char *name) {
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", r->keys_dir, name);
    arg(a, option);
    arg(a, path);
}

/* A restarted coordinator resumes from the newest checkpoint on the endpoint it had, which
 * every node and client already dials (their DEALERs reconnect by themselves). */
static int spawn_coordinator(run_t *r, run_child_t *c, const char *restart_why, char *err,
                             size_t errlen) {
    static run_args_t a;
    a.n = 0;
    bin(&a, r, "kdist-coordinator");
    arg(&a, "--recipe");
    arg(&a, r->recipe_path);
    arg(&a, "--run-dir");
    arg(&a, r->dir);
    if (r->resume || restart_why) arg(&a, "--resume");
    if (r->curve) arg_key(&a, r, "--key", "coordinator.key");
    arg_overrides(&a, r);
    if (r->curve) { /* recorded absolute: `kdist status RUN_DIR` finds client.key from anywhere */
        char dir[KD_PATH_MAX + 32];
        snprintf(dir, sizeof dir, "cluster.security.keys_dir=%s", r->keys_dir);
        arg(&a, dir);
    }
    if (restart_why) {
        char bind[KD_PATH_MAX + 32];
        snprintf(bind, sizeof bind, "cluster.bind=%s", r->endpoint);
        arg(&a, bind); /* after the user's overrides: the last one wins */
    }
    return spawn(r, c, a.argv, restart_why, err, errlen);
}

static int spawn_node(run_t *r, run_child_t *c, const char *restart_why, char *err, size_t errlen) {
    static run_args_t a;
    char id[32];
    snprintf(id, sizeof id, "%d", c->id);
    a.n = 0;
    bool teacher = strcmp(c->role, "teacher") == 0;
    bin(&a, r, teacher ? "kdist-teacher" : "kdist-worker");
    arg(&a, "--coordinator");
    arg(&a, r->endpoint);
    arg(&a, "--id");
    arg(&a, id);
    if (r->curve) {
        arg_key(&a, r, "--key", teacher ? "teacher.key" : "worker.key");
        arg_key(&a, r, "--coordinator-key", "coordinator.pub");
    }
    if (teacher) {
        arg(&a, "--recipe");
        arg(&a, r->recipe_path);
        arg_overrides(&a, r);
    } else if (r->recipe.train.threads > 0) {
        char threads[32];
        snprintf(threads, sizeof threads, "%ld", r->recipe.train.threads);
        arg(&a, "--threads");
        arg(&a, threads);
    }
    return spawn(r, c, a.argv, restart_why, err, errlen);
}

static bool is_role(const run_child_t *c, const char *role) {
    return strcmp(c->role, role) == 0;
}

/* Children of a role that are running and not on their way out. */
static int count_active(const run_t *r, const char *role) {
    int n = 0;
    for (int i = 0; i < r->n_children; i++) {
        const run_child_t *c = &r->children[i];
        if (c->pid && !c->exited && !c->draining && is_role(c, role)) n++;
    }
    return n;
}

/* cluster.restart_failed: the same role and id again, up to RESTART_LIMIT times. Returns 0 when
 * the child runs again. */
static int restart_child(run_t *r, run_child_t *c, const char *how) {
    if (!r->recipe.cluster.restart_failed || c->restarts >= RESTART_LIMIT) return -1;
    pid_t old = c->pid;
    c->restarts++;
    c->exited = false;
    c->killed_with = 0;
    char err[KD_ERR_LEN];
    int rc = is_role(c, "coordinator") ? spawn_coordinator(r, c, how, err, sizeof err)
                                       : spawn_node(r, c, how, err, sizeof err);
    if (rc != 0) {
        c->exited = true;
        c->pid = old;
        say(r, "cannot restart %s %d: %s", c->role, c->id, err);
        return -1;
    }
    say(r,
        "%s %d (pid %d) crashed: %s; restarting it as pid %d (restart %d of at most %d; log: "
        "%s)",
        c->role, c->id, (int)old, how, (int)c->pid, c->restarts, RESTART_LIMIT, c->log);
    return 0;
}

/* A child that was running exited. Clean exits are not news (nodes leave with 0 when the run
 * ends or they are drained); a crash while the run goes is restarted or reported at once. */
static void on_exit_during_run(run_t *r, run_child_t *c) {
    if (!r->running) return;
    if (child_ok(c)) {
        if (c->draining) say(r, "worker %d (pid %d) was drained and left", c->id, (int)c->pid);
        return;
    }
    char how[128];
    describe_wstatus(c->wstatus, how, sizeof how);
    if (c->draining) {
        say(r, "%s %d (pid %d) was draining and ended with %s (log: %s)", c->role, c->id,
            (int)c->pid, how, c->log);
        return;
    }
    if (restart_child(r, c, how) == 0) return;
    c->crashed = true;
    say(r, "error: %s %d (pid %d) crashed: %s; log: %s%s", c->role, c->id, (int)c->pid, how, c->log,
        r->recipe.cluster.restart_failed ? " (restart limit reached)"
                                         : " (cluster.restart_failed=true would restart it)");
    if (is_role(c, "coordinator"))
        r->stop_reason = "the coordinator crashed";
    else if (count_active(r, c->role) == 0)
        r->stop_reason = is_role(c, "worker") ? "no worker is left" : "no teacher node is left";
}

/* Collects every child that has exited; a death while the run is going is news at once. */
static void reap(run_t *r) {
    bool changed = false;
    for (int i = 0; i < r->n_children; i++) {
        run_child_t *c = &r->children[i];
        if (!c->pid || c->exited) continue;
        int st;
        pid_t p = waitpid(c->pid, &st, WNOHANG);
        if (p != c->pid) continue;
        c->exited = true;
        c->wstatus = st;
        changed = true;
        on_exit_during_run(r, c);
    }
    if (changed) write_launcher_json(r);
}

static bool all_exited(const run_t *r) {
    for (int i = 0; i < r->n_children; i++)
        if (r->children[i].pid && !r->children[i].exited) return false;
    return true;
}

static void signal_all(run_t *r, int sig) {
    for (int i = 0; i < r->n_children; i++) {
        run_child_t *c = &r->children[i];
        if (!c->pid || c->exited) continue;
        kill(c->pid, sig);
        c->killed_with = sig;
    }
}

static void sleep_ms(int ms) {
    poll(NULL, 0, ms);
} /* returns early on a signal: fine */

/* When the loop cannot go on: SIGTERM to every child now (SIGKILL if the user pressed Ctrl-C
 * twice), SIGKILL after TERM_DEADLINE. */
static void shut_down(run_t *r) {
    int sig = run_signals >= 2 ? SIGKILL : SIGTERM;
    signal_all(r, sig);
    double deadline = kd_now() + (sig == SIGTERM ? TERM_DEADLINE : KILL_DEADLINE);
    for (;;) {
        reap(r);
        if (all_exited(r)) return;
        if (sig == SIGTERM && (kd_now() > deadline || run_signals >= 2)) {
            signal_all(r, SIGKILL);
            sig = SIGKILL;
            deadline = kd_now() + KILL_DEADLINE;
        } else if (sig == SIGKILL && kd_now() > deadline) {
            return; /* unkillable (D state): give up rather than hang */
        }
        sleep_ms(20);
    }
}

static int wait_for_endpoint(run_t *r, run_child_t *coord, char *err, size_t errlen) {
    double deadline = kd_now() + ENDPOINT_DEADLINE;
    char rerr[KD_ERR_LEN];
    for (;;) {
        if (cli_read_endpoint(r->dir, r->endpoint, sizeof r->endpoint, rerr, sizeof rerr) == 0)
            return 0;
        reap(r);
        if (coord->exited) {
            char how[96];
            describe_wstatus(coord->wstatus, how, sizeof how);
            return kd_err(err, errlen, "the coordinator exited before it was ready: %s", how);
        }
        if (run_signals) return kd_err(err, errlen, "interrupted while the coordinator started");
        if (kd_now() > deadline)
            return kd_err(err, errlen,
                          "the coordinator did not write %s/coordinator.endpoint "
                          "within %.0f s",
                          r->dir, ENDPOINT_DEADLINE);
        sleep_ms(ENDPOINT_POLL_MS);
    }
}

/* ---- progress and summary ---------------------------------------------------------------- */

static void show_progress(run_t *r, const char *json, double *last_line) {
    cli_progress_t p;
    char err[KD_ERR_LEN], line[512];
    if (cli_progress_parse(json, &p, err, sizeof err) != 0) return;
    cli_progress_line(&p, line, sizeof line);
    if (r->tty) {
        fprintf(stderr, "\r\033[K%s", line);
        fflush(stderr);
        r->line_shown = true;
    } else if (kd_now() - *last_line >= LOG_LINES_EVERY) {
        fprintf(stderr, "%s\n", line);
        fflush(stderr);
        *last_line = kd_now();
    }
}

/* A summary field at the top level or inside "ledger". */
static json_t *summary_get(json_t *root, const char *key) {
    json_t *v = json_object_get(root, key);
    if (!v) v = json_object_get(json_object_get(root, "ledger"), key);
    return v;
}

static void row_num(json_t *root, const char *label, const char *key, const char *fmt,
                    double scale) {
    json_t *v = summary_get(root, key);
    printf("%-20s ", label);
    if (json_is_number(v))
        printf(fmt, scale * json_number_value(v));
    else
        printf("-");
    printf("\n");
}

/* Prints the final table; returns the summary's status (static storage) or NULL. */
static const char *print_summary(run_t *r) {
    static char status[32];
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/summary.json", r->dir);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!json_is_object(root)) {
        say(r, "no usable summary: %s: %s", path, jerr.text);
        json_decref(root);
        return NULL;
    }
    const char *s = json_string_value(json_object_get(root, "status"));
    snprintf(status, sizeof status, "%s", s ? s : "?");
    printf("\n%-20s %s\n", "run", r->recipe.name);
    printf("%-20s %s\n", "status", status);
    const char *error = json_string_value(json_object_get(root, "error"));
    if (error) printf("%-20s %s\n", "error", error);
    if (kd_recipe_is_lm(&r->recipe)) { /* per token */
        row_num(root, "val bits per byte", "val_bits_per_byte", "%.4f", 1.0);
        row_num(root, "val perplexity", "val_perplexity", "%.3f", 1.0);
        row_num(root, "test bits per byte", "test_bits_per_byte", "%.4f", 1.0);
        row_num(root, "test perplexity", "test_perplexity", "%.3f", 1.0);
        row_num(root, "next-token accuracy", "test_accuracy", "%.2f%% (test)", 100.0);
    } else {
        row_num(root, "test accuracy", "test_accuracy", "%.2f%%", 100.0);
        row_num(root, "val accuracy", "val_accuracy", "%.2f%%", 100.0);
    }
    row_num(root, "best step", "best_step", "%.0f", 1.0);
    row_num(root, "epochs", "epochs", "%.0f", 1.0);
    row_num(root, "steps", "steps", "%.0f", 1.0);
    row_num(root, "samples/s", "samples_per_sec", "%.0f", 1.0);
    if (kd_recipe_is_lm(&r->recipe)) row_num(root, "tokens/s", "tokens_per_sec", "%.0f", 1.0);
    row_num(root, "wall time", "wall_seconds", "%.1f s", 1.0);
    row_num(root, "workers max", "workers_max", "%.0f", 1.0);
    json_t *ap = summary_get(root, "batches_applied"), *ex = summary_get(root, "batches_expected");
    json_t *du = summary_get(root, "duplicates_dropped"), *re = summary_get(root, "restreamed");
    /* a run that train.max_steps ended applies fewer batches than its epochs hold, on purpose */
    const long steps = (long)json_number_value(summary_get(root, "steps"));
    const bool capped = r->recipe.train.max_steps > 0 && steps == r->recipe.train.max_steps &&
                        json_number_value(ap) < json_number_value(ex);
    printf("%-20s %lld/%lld batches applied%s, %lld duplicates dropped, %lld restreamed\n",
           "ledger", (long long)json_number_value(ap), (long long)json_number_value(ex),
           capped ? " (train.max_steps ended the run)" : "", (long long)json_number_value(du),
           (long long)json_number_value(re));
    json_t *lost = json_object_get(root, "members_lost"), *m;
    size_t i;
    json_array_foreach(lost, i, m) {
        const char *event = json_string_value(json_object_get(m, "event"));
        printf("%s%s %s (%s at %.1f s)", i ? ", " : "lost                 ",
               json_string_value(json_object_get(m, "role")),
               json_string_value(json_object_get(m, "id")),
               event && strcmp(event, "dead") == 0 ? "died" : "evicted",
               json_number_value(json_object_get(m, "time")));
    }
    if (json_array_size(lost)) printf("\n");
    snprintf(path, sizeof path, "%s/student.safetensors", r->dir);
    printf("%-20s %s%s\n", "weights", path, kd_file_exists(path) ? "" : " (missing)");
    fflush(stdout);
    json_decref(root);
    return status;
}

/* ---- kdist scale: the launcher's control socket ------------------------------------------ */

/* `kdist scale` reaches the launcher over a ZeroMQ REP socket whose endpoint launcher.json
 * records. Why this channel: the launcher already runs a ZeroMQ loop, so serving one more
 * socket costs a non-blocking receive per turn; request/reply gives `kdist scale` an immediate
 * answer (what was started, what drains, or why not) instead of a request file and a second
 * file for the answer; and REP answers one request at a time, so two `kdist scale` at once are
 * serialized without a lock. Messages are the protocol's own (kd_wire): Control{SCALE, workers}
 * -> StatusReply{json: {"before", "workers", "ids", "started", "draining"}} or Refused{reason}.
 * The socket is not encrypted but private: a unix socket in a directory only we may enter (mode
 * 0700): <run dir>/launcher/, or a fresh /tmp/kdist-launcher-XXXXXX when that path is too long
 * for a unix socket address. Never TCP: any local process can reach loopback (DESIGN §10). */
static int private_control_endpoint(run_t *r, const char *abs, char *endpoint, size_t n, char *err,
                                    size_t errlen) {
    struct sockaddr_un sun;
    char dir[KD_PATH_MAX + 16];
    snprintf(dir, sizeof dir, "%s/launcher", abs);
    if (strlen(dir) + strlen("/launcher.ipc") < sizeof sun.sun_path) {
        if (mkdir(dir, 0700) != 0 && errno != EEXIST)
            return kd_err(err, errlen, "cannot create %s: %s", dir, strerror(errno));
        struct stat st;
        if (lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode) || chmod(dir, 0700) != 0)
            return kd_err(err, errlen, "%s: not a directory kdist can make private", dir);
    } else {
        snprintf(r->control_tmpdir, sizeof r->control_tmpdir, "/tmp/kdist-launcher-XXXXXX");
        if (!mkdtemp(r->control_tmpdir)) { /* mode 0700 */
            r->control_tmpdir[0] = 0;
            return kd_err(err, errlen, "cannot create a private directory in /tmp: %s",
                          strerror(errno));
        }
        snprintf(dir, sizeof dir, "%s", r->control_tmpdir);
    }
    if (snprintf(endpoint, n, "ipc://%s/launcher.ipc", dir) >= (int)n)
        return kd_err(err, errlen, "%s: too long a path for the control socket", dir);
    return 0;
}

static int control_open(run_t *r, char *err, size_t errlen) {
    char abs[KD_PATH_MAX], endpoint[KD_PATH_MAX + 32];
    if (!realpath(r->dir, abs))
        return kd_err(err, errlen, "cannot resolve %s: %s", r->dir, strerror(errno));
    if (private_control_endpoint(r, abs, endpoint, sizeof endpoint, err, errlen) != 0) return -1;
    r->control_ctx = zmq_ctx_new();
    if (!r->control_ctx)
        return kd_err(err, errlen, "cannot create a ZeroMQ context: %s", zmq_strerror(errno));
    r->control = zmq_socket(r->control_ctx, ZMQ_REP);
    if (!r->control) return kd_err(err, errlen, "cannot create a socket: %s", zmq_strerror(errno));
    int zero = 0;
    int64_t max = CONTROL_MAX_BYTES;
    zmq_setsockopt(r->control, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(r->control, ZMQ_MAXMSGSIZE, &max, sizeof max);
    if (kd_socket_bind(r->control, endpoint, r->control_endpoint, sizeof r->control_endpoint, err,
                       errlen) == 0)
        return 0;
    zmq_close(r->control);
    r->control = NULL;
    r->control_endpoint[0] = 0;
    return -1;
}

static void control_close(run_t *r) {
    if (r->control) zmq_close(r->control);
    if (r->control_ctx) zmq_ctx_term(r->control_ctx);
    r->control = r->control_ctx = NULL;
    /* libzmq 4.3 leaves the socket file behind; a later bind would replace it anyway */
    if (strncmp(r->control_endpoint, "ipc://", 6) == 0) unlink(r->control_endpoint + 6);
    if (r->control_tmpdir[0]) rmdir(r->control_tmpdir);
}

/* cluster.security.curve: every role's key pair must be in keys_dir before anything starts;
 * the children get theirs as options, this process's control client (progress, drains) uses
 * client.key. With curve off, a KDIST_KEY of the user's must not turn the children's sockets
 * into CurveZMQ ones (kd_curve_client_from_args reads it): it is dropped. */
static int setup_curve(run_t *r, char *err, size_t errlen) {
    const char *dir = r->recipe.cluster.security.keys_dir;
    r->curve = r->recipe.cluster.security.curve;
    if (!r->curve) {
        unsetenv(KD_CURVE_ENV_KEY);
        unsetenv(KD_CURVE_ENV_SERVER);
        return 0;
    }
    if (!dir[0])
        return kd_err(err, errlen,
                      "%s sets cluster.security.curve: kdist run needs cluster.security.keys_dir, "
                      "a directory made by `kdist keygen --cluster DIR`",
                      r->recipe_path);
    if (!realpath(dir, r->keys_dir))
        return kd_err(err, errlen, "%s: cluster.security.keys_dir '%s': %s", r->recipe_path, dir,
                      strerror(errno));
    kd_curve_pair_t pair[CLI_KEY_ROLES];
    for (int i = 0; i < CLI_KEY_ROLES; i++) {
        char path[KD_PATH_MAX + 32], why[KD_ERR_LEN];
        snprintf(path, sizeof path, "%s/%s.key", r->keys_dir, cli_key_roles[i]);
        if (kd_curve_load_pair(path, &pair[i], why, sizeof why) != 0)
            return kd_err(err, errlen,
                          "%s: cluster.security.keys_dir: %s (make the pairs with `kdist keygen "
                          "--cluster %s`)",
                          r->recipe_path, why, dir);
    }
    r->client_curve.self = pair[CLI_KEY_CLIENT];
    memcpy(r->client_curve.server_z85, pair[CLI_KEY_COORDINATOR].public_z85,
           sizeof r->client_curve.server_z85);
    return 0;
}

static json_t *id_text(int id) {
    char s[32];
    snprintf(s, sizeof s, "%d", id);
    return json_string(s);
}

/* Asks the coordinator to drain c: it finishes its step, gets stop, says goodbye, exits 0. */
static void drain_worker(run_t *r, run_child_t *c) {
    char id[32], err[KD_ERR_LEN];
    snprintf(id, sizeof id, "%d", c->id);
    if (cli_client_control(r->client, KDIST__CONTROL__KIND__DRAIN, id, err, sizeof err) != 0)
        say(r, "cannot drain worker %d: %s (sent again in %.0f s)", c->id, err, DRAIN_RESEND);
    double now = kd_now();
    if (!c->draining) c->drain_since = now;
    c->draining = true;
    c->drain_sent = now;
}

/* Workers up: fresh ids, spawned like the first ones. Down: the highest ids drain. Returns
 * the answer's JSON (caller owns it), or NULL with err set. */
static json_t *scale_to(run_t *r, long want, char *err, size_t errlen) {
    if (!r->running)
        return kd_err(err, errlen, "the run is stopping: it cannot be scaled any more"), NULL;
    if (want < 1 || want > SCALE_MAX_WORKERS)
        return kd_err(err, errlen, "the worker count must be between 1 and %d, not %ld",
                      SCALE_MAX_WORKERS, want),
               NULL;
    int before = count_active(r, "worker");
    json_t *started = json_array(), *draining = json_array();
    for (int n = before; n < want; n++) {
        run_child_t *c = add_child(r, "worker", r->next_worker_id++);
        if (spawn_node(r, c, NULL, err, errlen) != 0) {
            r->n_children--; /* never started */
            json_decref(started);
            json_decref(draining);
            write_launcher_json(r);
            return NULL;
        }
        json_array_append_new(started, id_text(c->id));
    }
    for (int n = before; n > want; n--) {
        run_child_t *last = NULL;
        for (int i = 0; i < r->n_children; i++) {
            run_child_t *c = &r->children[i];
            if (c->pid && !c->exited && !c->draining && is_role(c, "worker") &&
                (!last || c->id > last->id))
                last = c;
        }
        drain_worker(r, last);
        json_array_append_new(draining, id_text(last->id));
    }
    json_t *ids = json_array();
    for (int i = 0; i < r->n_children; i++) {
        run_child_t *c = &r->children[i];
        if (c->pid && !c->exited && !c->draining && is_role(c, "worker"))
            json_array_append_new(ids, id_text(c->id));
    }
    if (want != before)
        say(r, "scaling from %d to %ld worker%s", before, want, want == 1 ? "" : "s");
    write_launcher_json(r);
    return json_pack("{s:i, s:i, s:o, s:o, s:o}", "before", before, "workers", (int)want, "ids",
                     ids, "started", started, "draining", draining);
}

/* StatusReply{json} with the result, or Refused{reason}. */
static void control_reply(run_t *r, json_t *result, const char *reason) {
    char *text = result ? json_dumps(result, JSON_COMPACT) : NULL;
    kd_env_t env = KDIST__ENVELOPE__INIT;
    Kdist__StatusReply status = KDIST__STATUS_REPLY__INIT;
    Kdist__Refused refused = KDIST__REFUSED__INIT;
    if (text) {
        status.json = text;
        env.body_case = KDIST__ENVELOPE__BODY_STATUS;
        env.status = &status;
    } else {
        refused.reason = (char *)(result ? "cannot encode the answer" : reason);
        env.body_case = KDIST__ENVELOPE__BODY_REFUSED;
        env.refused = &refused;
    }
    if (kd_wire_send(r->control, NULL, 0, &env, NULL, 0, ZMQ_DONTWAIT) != 0)
        say(r, "cannot answer `kdist scale`: %s", zmq_strerror(errno));
    free(text);
}

/* Answers the request waiting on the control socket, if any. Never blocks. A REP socket must
 * answer every request it took, malformed ones included, or it accepts no other. */
static void control_serve(run_t *r) {
    if (!r->control) return;
    kd_msg_t msg;
    char err[KD_ERR_LEN], why[KD_ERR_LEN + 32];
    int rc = kd_wire_recv(r->control, false, ZMQ_DONTWAIT, &msg, err, sizeof err);
    if (rc == KD_WIRE_NONE || rc == KD_WIRE_CLOSED) return;
    json_t *result = NULL;
    if (rc == KD_WIRE_BAD) {
        snprintf(why, sizeof why, "malformed request: %s", err);
    } else {
        if (msg.env->body_case != KDIST__ENVELOPE__BODY_CONTROL ||
            msg.env->control->kind != KDIST__CONTROL__KIND__SCALE)
            snprintf(why, sizeof why, "the launcher answers Control{SCALE} only, not %s %d",
                     kd_wire_body_name(msg.env),
                     msg.env->body_case == KDIST__ENVELOPE__BODY_CONTROL
                         ? (int)msg.env->control->kind
                         : 0);
        else if (!(result = scale_to(r, (long)msg.env->control->workers, err, sizeof err)))
            snprintf(why, sizeof why, "%s", err);
        kd_msg_close(&msg);
    }
    control_reply(r, result, why);
    json_decref(result);
}

/* Drained workers leave after their step. The first DRAIN may have come before the worker's
 * Hello (the coordinator ignores unknown ids), so it is repeated; one that lingers past
 * DRAIN_GRACE gets SIGTERM, which a worker also answers by finishing its step and leaving. */
static void follow_drains(run_t *r) {
    double now = kd_now();
    for (int i = 0; i < r->n_children; i++) {
        run_child_t *c = &r->children[i];
        if (!c->draining || c->exited || c->killed_with) continue;
        if (now - c->drain_since > DRAIN_GRACE) {
            say(r, "worker %d is still running %.0f s after it was drained: sending SIGTERM", c->id,
                DRAIN_GRACE);
            kill(c->pid, SIGTERM);
            c->killed_with = SIGTERM;
        } else if (now - c->drain_sent > DRAIN_RESEND) {
            drain_worker(r, c);
        }
    }
}

/* "restarts  worker 1 (1x), teacher 0 (2x)" when cluster.restart_failed had work to do. */
static void print_restarts(const run_t *r) {
    bool any = false;
    for (int i = 0; i < r->n_children; i++) {
        const run_child_t *c = &r->children[i];
        if (!c->restarts) continue;
        printf("%s%s %d (%dx)", any ? ", " : "restarts             ", c->role, c->id, c->restarts);
        any = true;
    }
    if (any) printf("\n");
    fflush(stdout);
}

/* ---- kdist run --------------------------------------------------------------------------- */

enum { PH_RUN, PH_WAIT, PH_TERM, PH_KILL };

/* The main loop: status polling, deaths, restarts, `kdist scale`, Ctrl-C and the shutdown
 * deadlines. Returns whether the user interrupted the run. */
static bool supervise(run_t *r) {
    cli_client_t *client = r->client;
    int phase = PH_RUN, seen = 0;
    bool interrupted = false, outstanding = false;
    double deadline = 0, next_status = 0, sent_at = 0, last_line = 0;
    double last_complaint = -1e9;
    r->running = true;
    for (;;) {
        reap(r);
        if (all_exited(r)) break;
        run_child_t *coord = &r->children[0]; /* refreshed: scaling may move the array */
        double now = kd_now();
        if (phase == PH_RUN && r->stop_reason && !coord->exited) {
            char err[KD_ERR_LEN];
            say(r, "%s: stopping the run", r->stop_reason);
            r->running = false;
            if (cli_client_control(client, KDIST__CONTROL__KIND__STOP, NULL, err, sizeof err) !=
                0) {
                kill(coord->pid, SIGTERM);
                coord->killed_with = SIGTERM;
            }
            phase = PH_WAIT;
            deadline = now + STOP_DEADLINE;
        }
        int sigs = run_signals;
        if (sigs > seen) {
            seen = sigs;
            interrupted = true;
            r->running = false;
            if (phase == PH_RUN) {
                char err[KD_ERR_LEN];
                say(r, "stopping: Control{STOP} sent to the coordinator (Ctrl-C again kills "
                       "every process now)");
                if (cli_client_control(client, KDIST__CONTROL__KIND__STOP, NULL, err, sizeof err) !=
                    0) {
                    say(r, "%s; sending SIGTERM to the coordinator instead", err);
                    kill(coord->pid, SIGTERM);
                    coord->killed_with = SIGTERM;
                }
                phase = PH_WAIT;
                deadline = now + STOP_DEADLINE;
            } else if (sigs == 1 && phase == PH_WAIT) {
                /* the coordinator is gone already: the stragglers get SIGTERM, not STOP */
                say(r, "stopping: SIGTERM to the remaining processes");
                signal_all(r, SIGTERM);
                phase = PH_TERM;
                deadline = now + TERM_DEADLINE;
            } else if (phase < PH_KILL) {
                say(r, "killing every process now");
                signal_all(r, SIGKILL);
                phase = PH_KILL;
                deadline = now + KILL_DEADLINE;
            }
        }
        if (phase == PH_RUN && coord->exited) {
            r->running = false;
            phase = PH_WAIT;
            deadline = now + DRAIN_DEADLINE;
            if (coord->crashed) { /* nobody will tell the others to stop */
                signal_all(r, SIGTERM);
                phase = PH_TERM;
                deadline = now + TERM_DEADLINE;
            }
        }
        if (phase != PH_RUN && now > deadline) {
            if (phase == PH_WAIT) {
                say(r, "processes still running %.0f s after the coordinator %s: sending SIGTERM",
                    interrupted ? STOP_DEADLINE : DRAIN_DEADLINE,
                    interrupted ? "was told to stop" : "exited");
                signal_all(r, SIGTERM);
                phase = PH_TERM;
                deadline = now + TERM_DEADLINE;
            } else if (phase == PH_TERM) {
                say(r, "processes ignored SIGTERM for %.0f s: sending SIGKILL", TERM_DEADLINE);
                signal_all(r, SIGKILL);
                phase = PH_KILL;
                deadline = now + KILL_DEADLINE;
            } else {
                say(r, "some processes could not be reaped; giving up on them");
                break;
            }
        }
        control_serve(r); /* also when stopping: `kdist scale` hears why not */
        if (coord->exited) {
            sleep_ms(20);
            continue;
        }
        if (phase == PH_RUN) follow_drains(r);
        if (now >= next_status) {
            char err[KD_ERR_LEN];
            if (!outstanding || now - sent_at > STATUS_RETRY) {
                if (cli_client_control(client, KDIST__CONTROL__KIND__STATUS, NULL, err,
                                       sizeof err) == 0) {
                    outstanding = true;
                    sent_at = now;
                }
            }
            next_status = now + STATUS_EVERY;
        }
        char *json = NULL, err[KD_ERR_LEN];
        int got = cli_client_wait_status(client, 100, &json, err, sizeof err);
        if (got == 0) {
            outstanding = false;
            show_progress(r, json, &last_line);
        } else if (got < 0 && kd_now() - last_complaint > 10.0) {
            say(r, "status: %s", err);
            last_complaint = kd_now();
        }
        free(json);
    }
    return interrupted;
}

int cli_run_dir(const cli_run_spec_t *spec, const kd_recipe_t *recipe, char *out, size_t outlen,
                char *err, size_t errlen) {
    int len = spec->run_dir
                  ? snprintf(out, outlen, "%s", spec->run_dir)
                  : snprintf(out, outlen, "%s/%s", recipe->logging.runs_dir, recipe->name);
    if (len < 0 || (size_t)len >= outlen)
        return kd_err(err, errlen, "the run directory path is too long: %s", out);
    return 0;
}

bool cli_run_interrupted(void) {
    return run_signals > 0;
}

int cli_run_cluster(const cli_run_spec_t *spec) {
    run_t *r = kd_xcalloc(1, sizeof *r);
    char err[KD_ERR_LEN];
    int rc = 1;
    r->self = getpid();
    r->tty = isatty(STDERR_FILENO);
    r->recipe_path = spec->recipe_path;
    r->overrides = spec->overrides;
    r->n_overrides = spec->n_overrides;
    r->resume = spec->resume;
    if (r->n_overrides > CLI_RUN_MAX_OVERRIDES) {
        fprintf(stderr, "kdist run: more than %d overrides\n", CLI_RUN_MAX_OVERRIDES);
        rc = 2;
        goto cleanup;
    }
    if (kd_recipe_load(r->recipe_path, r->overrides, r->n_overrides, &r->recipe, err, sizeof err) !=
            0 ||
        kd_recipe_check_cluster(&r->recipe, r->recipe_path, err, sizeof err) != 0 ||
        cli_run_dir(spec, &r->recipe, r->dir, sizeof r->dir, err, sizeof err) != 0) {
        fprintf(stderr, "kdist run: %s\n", err);
        rc = 2;
        goto cleanup;
    }
    const struct {
        const char *hold, *count, *what;
        long wanted, started;
    } holds[] = {
        {"start_workers", "workers", "workers", r->recipe.cluster.start_workers,
         r->recipe.cluster.workers},
        {"start_teachers", "teachers", "teacher nodes", r->recipe.cluster.start_teachers,
         r->recipe.cluster.teachers},
    };
    for (size_t i = 0; i < sizeof holds / sizeof holds[0]; i++) {
        if (holds[i].wanted <= holds[i].started) continue;
        fprintf(stderr,
                "kdist run: %s: cluster.%s %ld is more than the %ld %s kdist run starts "
                "(cluster.%s): the run would never begin\n",
                r->recipe_path, holds[i].hold, holds[i].wanted, holds[i].started, holds[i].what,
                holds[i].count);
        rc = 2;
        goto cleanup;
    }
    if (setup_curve(r, err, sizeof err) != 0) {
        fprintf(stderr, "kdist run: %s\n", err);
        rc = 2;
        goto cleanup;
    }
    if (find_binaries(r, err, sizeof err) != 0 || prepare_run_dir(r, err, sizeof err) != 0) {
        fprintf(stderr, "kdist run: %s\n", err);
        goto cleanup;
    }
    install_signals();
    int n_teachers = (int)r->recipe.cluster.teachers, n_workers = (int)r->recipe.cluster.workers;
    r->next_worker_id = n_workers;

    run_child_t *coord = add_child(r, "coordinator", 0);
    if (spawn_coordinator(r, coord, NULL, err, sizeof err) != 0) {
        say(r, "%s", err);
        goto cleanup;
    }
    write_launcher_json(r);
    if (wait_for_endpoint(r, coord, err, sizeof err) != 0) {
        say(r, "%s", err);
        shut_down(r);
        print_log_tail(coord->log, TAIL_LINES);
        goto cleanup;
    }
    fprintf(stderr,
            "kdist run: '%s': coordinator at %s, %d teacher%s, %d worker%s; logs in %s/logs\n",
            r->recipe.name, r->endpoint, n_teachers, n_teachers == 1 ? "" : "s", n_workers,
            n_workers == 1 ? "" : "s", r->dir);
    for (int i = 0; i < n_teachers + n_workers; i++) {
        run_child_t *c = add_child(r, i < n_teachers ? "teacher" : "worker",
                                   i < n_teachers ? i : i - n_teachers);
        if (spawn_node(r, c, NULL, err, sizeof err) != 0) {
            say(r, "%s", err);
            r->n_children--; /* never started */
            shut_down(r);
            goto cleanup;
        }
    }
    /* stop and drain go over the coordinator's local control channel, which needs no key */
    if (cli_read_control_endpoint(r->dir, r->coord_control, sizeof r->coord_control, err,
                                  sizeof err) != 0) {
        say(r, "%s", err);
        shut_down(r);
        goto cleanup;
    }
    r->client = cli_client_new(r->coord_control, NULL, err, sizeof err);
    if (!r->client) {
        say(r, "%s", err);
        shut_down(r);
        goto cleanup;
    }
    if (control_open(r, err, sizeof err) != 0) /* the run goes on, only scaling is off */
        say(r, "warning: `kdist scale` will not reach this run: %s", err);
    write_launcher_json(r);

    bool interrupted = supervise(r);
    coord = &r->children[0];
    if (r->line_shown) fputc('\n', stderr);
    r->line_shown = false;
    write_launcher_json(r);
    /* The coordinator is gone: an endpoint left behind would make `kdist status` (which picks
     * the newest run with one) knock on a dead port. */
    if (coord->exited) remove_path(r->dir, "coordinator.endpoint", false, err, sizeof err);

    int failed = 0;
    for (int i = 0; i < r->n_children; i++) {
        run_child_t *c = &r->children[i];
        if (child_ok(c)) continue;
        char how[96];
        if (c->exited)
            describe_wstatus(c->wstatus, how, sizeof how);
        else
            snprintf(how, sizeof how, "could not be reaped");
        say(r, "%s %d failed: %s%s", c->role, c->id, how,
            c->killed_with ? " (signalled by kdist)" : "");
        print_log_tail(c->log, TAIL_LINES);
        failed++;
    }
    const char *status = print_summary(r);
    print_restarts(r);
    bool good =
        status && (strcmp(status, "completed") == 0 || strcmp(status, "early_stopped") == 0);
    if (interrupted || (!good && status))
        say(r, "%sthe run ended with status '%s'", interrupted ? "interrupted: " : "",
            status ? status : "unknown");
    /* The exit code says whether the run completed (a script's `kdist run ... && publish`);
     * roles that died on the way are named above, in the table and in summary.json. A
     * coordinator that could not save the final weights exits non-zero: not completed. */
    if (failed && good && child_ok(coord))
        say(r, "the run completed without %s: its ledger is whole (the table's 'lost' row)",
            failed == 1 ? "the process that failed" : "the processes that failed");
    rc = good && child_ok(coord) ? 0 : 1;
cleanup:
    control_close(r);
    cli_client_destroy(&r->client);
    free(r->children);
    free(r);
    return rc;
}
