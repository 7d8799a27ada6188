/* kdist run: the local launcher. Starts the coordinator, the teacher nodes and the workers as
 * child processes (logs in <run>/logs/), shows progress from the coordinator's StatusReply,
 * turns Ctrl-C into Control{STOP}, reaps every child within deadlines, prints the summary. */
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
#include <sys/wait.h>
#include <unistd.h>

#include "kd_cli.h"
#include "kd_recipe.h"
#include "kd_util.h"

#define RUN_MAX_OVERRIDES 64
#define RUN_MAX_ARGS      (RUN_MAX_OVERRIDES + 16)
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

typedef struct {
    const char *role; /* "coordinator" | "teacher" | "worker" */
    int id;
    pid_t pid;
    char log[KD_PATH_MAX + 64];
    bool exited;
    int wstatus;
    int killed_with; /* the last signal kdist sent it, 0 if none */
} run_child_t;

typedef struct {
    const char *recipe_path;
    const char *overrides[RUN_MAX_OVERRIDES];
    int n_overrides;
    const char *run_dir_arg;
    bool resume;
    kd_recipe_t recipe;
    char dir[KD_PATH_MAX];
    char bin_dir[KD_PATH_MAX];
    char endpoint[KD_PATH_MAX];
    run_child_t *children;
    int n_children;
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

static void usage(FILE *out) {
    fprintf(out, "usage: kdist run RECIPE [section.key=value ...] [--run-dir DIR] [--resume]\n"
                 "  starts a coordinator, cluster.teachers teacher nodes and cluster.workers\n"
                 "  workers on this machine; outputs and logs go to <logging.runs_dir>/<name>/\n"
                 "  --resume  keep checkpoints/ and continue from the newest one\n");
}

/* Messages go to stderr below any live progress line, which is cleared first. */
static void say(run_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(run_t *r, const char *fmt, ...) {
    if (r->line_shown) fputs("\r\033[K", stderr);
    r->line_shown = false;
    va_list ap;
    va_start(ap, fmt);
    fputs("kdist run: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fflush(stderr);
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
        json_t *o =
            json_pack("{s:s, s:i, s:i, s:s, s:s}", "role", c->role, "id", c->id, "pid", (int)c->pid,
                      "log", c->log, "state", c->exited ? "exited" : "running");
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
        json_pack("{s:i, s:s, s:s, s:s, s:o, s:s, s:o}", "launcher_pid", (int)r->self, "run_dir",
                  r->dir, "recipe", r->recipe_path, "bin_dir", r->bin_dir, "overrides", overrides,
                  "coordinator_endpoint", r->endpoint, "children", kids);
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(root);
    char path[KD_PATH_MAX + 64], err[KD_ERR_LEN];
    snprintf(path, sizeof path, "%s/launcher.json", r->dir);
    if (!text || kd_write_file_atomic(path, text, strlen(text), err, sizeof err) != 0)
        say(r, "warning: %s", text ? err : "cannot encode launcher.json");
    free(text);
}

/* ---- children ---------------------------------------------------------------------------- */

static run_child_t *add_child(run_t *r, const char *role, int id) {
    run_child_t *c = &r->children[r->n_children++];
    memset(c, 0, sizeof *c);
    c->role = role;
    c->id = id;
    snprintf(c->log, sizeof c->log, "%s/logs/%s-%d.log", r->dir, role, id);
    return c;
}

/* fork + exec with stdout/stderr in the child's log. The child dies with us (PDEATHSIG). */
static int spawn(run_t *r, run_child_t *c, char *const argv[], char *err, size_t errlen) {
    int fd = open(c->log, O_WRONLY | O_CREAT | O_CLOEXEC | (r->resume ? O_APPEND : O_TRUNC), 0644);
    if (fd < 0) return kd_err(err, errlen, "cannot open %s: %s", c->log, strerror(errno));
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

static int spawn_coordinator(run_t *r, run_child_t *c, char *err, size_t errlen) {
    static run_args_t a;
    a.n = 0;
    bin(&a, r, "kdist-coordinator");
    arg(&a, "--recipe");
    arg(&a, r->recipe_path);
    arg(&a, "--run-dir");
    arg(&a, r->dir);
    if (r->resume) arg(&a, "--resume");
    arg_overrides(&a, r);
    return spawn(r, c, a.argv, err, errlen);
}

static int spawn_node(run_t *r, run_child_t *c, char *err, size_t errlen) {
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
    return spawn(r, c, a.argv, err, errlen);
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
        /* clean exits are not news: nodes leave with 0 when the run ends or they are drained */
        if (r->running && strcmp(c->role, "coordinator") != 0 && !child_ok(c)) {
            char how[96];
            describe_wstatus(st, how, sizeof how);
            say(r, "%s %d (pid %d) died: %s (log: %s)", c->role, c->id, (int)c->pid, how, c->log);
        }
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
    row_num(root, "test accuracy", "test_accuracy", "%.2f%%", 100.0);
    row_num(root, "val accuracy", "val_accuracy", "%.2f%%", 100.0);
    row_num(root, "best step", "best_step", "%.0f", 1.0);
    row_num(root, "epochs", "epochs", "%.0f", 1.0);
    row_num(root, "steps", "steps", "%.0f", 1.0);
    row_num(root, "samples/s", "samples_per_sec", "%.0f", 1.0);
    row_num(root, "wall time", "wall_seconds", "%.1f s", 1.0);
    row_num(root, "workers max", "workers_max", "%.0f", 1.0);
    json_t *ap = summary_get(root, "batches_applied"), *ex = summary_get(root, "batches_expected");
    json_t *du = summary_get(root, "duplicates_dropped"), *re = summary_get(root, "restreamed");
    printf("%-20s %lld/%lld batches applied, %lld duplicates dropped, %lld restreamed\n", "ledger",
           (long long)json_number_value(ap), (long long)json_number_value(ex),
           (long long)json_number_value(du), (long long)json_number_value(re));
    snprintf(path, sizeof path, "%s/student.safetensors", r->dir);
    printf("%-20s %s%s\n", "weights", path, kd_file_exists(path) ? "" : " (missing)");
    fflush(stdout);
    json_decref(root);
    return status;
}

/* ---- kdist run --------------------------------------------------------------------------- */

static int parse_args(run_t *r, int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strlen(a) >= KD_PATH_MAX) {
            fprintf(stderr, "kdist run: argument too long: %.40s...\n", a);
            return -1;
        }
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(0);
        } else if (strcmp(a, "--run-dir") == 0 && i + 1 < argc)
            r->run_dir_arg = argv[++i];
        else if (strncmp(a, "--run-dir=", 10) == 0)
            r->run_dir_arg = a + 10;
        else if (strcmp(a, "--resume") == 0)
            r->resume = true;
        else if (a[0] == '-') {
            fprintf(stderr, "kdist run: unknown or incomplete option '%s'\n", a);
            return -1;
        } else if (strchr(a, '=')) {
            if (r->n_overrides == RUN_MAX_OVERRIDES) {
                fprintf(stderr, "kdist run: more than %d overrides\n", RUN_MAX_OVERRIDES);
                return -1;
            }
            r->overrides[r->n_overrides++] = a;
        } else if (!r->recipe_path)
            r->recipe_path = a;
        else {
            fprintf(stderr, "kdist run: unexpected argument '%s'\n", a);
            return -1;
        }
    }
    if (!r->recipe_path) {
        fprintf(stderr, "kdist run: no recipe given\n");
        return -1;
    }
    return 0;
}

enum { PH_RUN, PH_WAIT, PH_TERM, PH_KILL };

/* The main loop: status polling, deaths, Ctrl-C and the shutdown deadlines. Returns whether
 * the user interrupted the run. */
static bool supervise(run_t *r, run_child_t *coord, cli_client_t *client) {
    int phase = PH_RUN, seen = 0;
    bool interrupted = false, outstanding = false;
    double deadline = 0, next_status = 0, sent_at = 0, last_line = 0;
    double last_complaint = -1e9;
    r->running = true;
    for (;;) {
        reap(r);
        if (all_exited(r)) break;
        double now = kd_now();
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
        if (coord->exited) {
            sleep_ms(20);
            continue;
        }
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

int kd_cmd_run(int argc, char **argv) {
    run_t *r = kd_xcalloc(1, sizeof *r);
    cli_client_t *client = NULL;
    char err[KD_ERR_LEN];
    int rc = 1;
    r->self = getpid();
    r->tty = isatty(STDERR_FILENO);
    if (parse_args(r, argc, argv) != 0) {
        usage(stderr);
        rc = 2;
        goto cleanup;
    }
    if (kd_recipe_load(r->recipe_path, r->overrides, r->n_overrides, &r->recipe, err, sizeof err) !=
        0) {
        fprintf(stderr, "kdist run: %s\n", err);
        rc = 2;
        goto cleanup;
    }
    int len = r->run_dir_arg ? snprintf(r->dir, sizeof r->dir, "%s", r->run_dir_arg)
                             : snprintf(r->dir, sizeof r->dir, "%s/%s", r->recipe.logging.runs_dir,
                                        r->recipe.name);
    if (len < 0 || (size_t)len >= sizeof r->dir) {
        fprintf(stderr, "kdist run: the run directory path is too long: %s\n", r->dir);
        rc = 2;
        goto cleanup;
    }
    if (find_binaries(r, err, sizeof err) != 0 || prepare_run_dir(r, err, sizeof err) != 0) {
        fprintf(stderr, "kdist run: %s\n", err);
        goto cleanup;
    }
    install_signals();
    int n_teachers = (int)r->recipe.cluster.teachers, n_workers = (int)r->recipe.cluster.workers;
    r->children = kd_xcalloc((size_t)(1 + n_teachers + n_workers), sizeof *r->children);

    run_child_t *coord = add_child(r, "coordinator", 0);
    if (spawn_coordinator(r, coord, err, sizeof err) != 0) {
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
        if (spawn_node(r, c, err, sizeof err) != 0) {
            say(r, "%s", err);
            r->n_children--; /* never started */
            shut_down(r);
            goto cleanup;
        }
    }
    write_launcher_json(r);
    client = cli_client_new(r->endpoint, err, sizeof err);
    if (!client) {
        say(r, "%s", err);
        shut_down(r);
        goto cleanup;
    }

    bool interrupted = supervise(r, coord, client);
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
    bool good =
        status && (strcmp(status, "completed") == 0 || strcmp(status, "early_stopped") == 0);
    if (interrupted || (!good && status))
        say(r, "%sthe run ended with status '%s'", interrupted ? "interrupted: " : "",
            status ? status : "unknown");
    rc = failed || !good ? 1 : 0;
cleanup:
    cli_client_destroy(&client);
    free(r->children);
    free(r);
    return rc;
}
