/* kdist run: the steps around one cluster run (kd_run.c). A distillation needs a trained teacher:
 * when teacher.checkpoint does not exist, the recipe named by teacher.recipe runs first, as a
 * `kdist run` of its own. Then the run itself; with --baseline the same recipe again with
 * distill.alpha=0 as <name>_alone (the student alone), unless an identical one completed before;
 * at the end the comparison table (kd_compare.c) in runs/<name>/comparison.json.
 * Single-threaded. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "kd_cli.h"

#define USER_MAX_OVERRIDES 64
#define TEACHER_PREFIX     "teacher_run."
#define TEACHER_MAX_DEPTH  4 /* a teacher trained by a distillation whose teacher ... */
#define ALONE_SUFFIX       "_alone"

typedef struct {
    const char *recipe_path;
    const char *overrides[CLI_RUN_MAX_OVERRIDES];
    int n_overrides;
    const char *teacher_overrides[USER_MAX_OVERRIDES]; /* teacher_run.* without the prefix */
    int n_teacher_overrides;
    const char *run_dir;
    bool resume, baseline;
} plan_t;

static void usage(FILE *out) {
    fprintf(out,
            "usage: kdist run RECIPE [section.key=value ...] [teacher_run.section.key=value ...]\n"
            "                 [--baseline] [--run-dir DIR] [--resume]\n"
            "  starts a coordinator, cluster.teachers teacher nodes and cluster.workers\n"
            "  workers on this machine; outputs and logs go to <logging.runs_dir>/<name>/\n"
            "  --resume    keep checkpoints/ and continue from the newest one\n"
            "  --baseline  also train the student alone (distill.alpha=0) as <name>_alone,\n"
            "              or reuse it when it completed before with the same recipe\n"
            "  A distillation (distill.alpha > 0) whose teacher.checkpoint does not exist\n"
            "  first runs teacher.recipe; overrides prefixed teacher_run. apply to that run\n"
            "  only (the data location, logging, threads and cluster networking apply to\n"
            "  both). It ends with a table: teacher, student alone, distilled student\n"
            "  (test accuracy, parameters, size on disk, inference samples/s), also written to\n"
            "  <run dir>/comparison.json.\n"
            "  while it runs: kdist status|scale|drain <run dir>\n");
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    cli_vnote(fmt, ap);
    va_end(ap);
}

static int parse_args(plan_t *p, int argc, char **argv) {
    int n_user = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strlen(a) >= KD_PATH_MAX) {
            note("argument too long: %.40s...", a);
            return -1;
        }
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(0);
        } else if (strcmp(a, "--run-dir") == 0 && i + 1 < argc)
            p->run_dir = argv[++i];
        else if (strncmp(a, "--run-dir=", 10) == 0)
            p->run_dir = a + 10;
        else if (strcmp(a, "--resume") == 0)
            p->resume = true;
        else if (strcmp(a, "--baseline") == 0)
            p->baseline = true;
        else if (a[0] == '-') {
            note("unknown or incomplete option '%s'", a);
            return -1;
        } else if (strchr(a, '=')) {
            if (n_user++ == USER_MAX_OVERRIDES) {
                note("more than %d overrides", USER_MAX_OVERRIDES);
                return -1;
            }
            if (strncmp(a, TEACHER_PREFIX, strlen(TEACHER_PREFIX)) == 0)
                p->teacher_overrides[p->n_teacher_overrides++] = a + strlen(TEACHER_PREFIX);
            else
                p->overrides[p->n_overrides++] = a;
        } else if (!p->recipe_path)
            p->recipe_path = a;
        else {
            note("unexpected argument '%s'", a);
            return -1;
        }
    }
    if (!p->recipe_path) {
        note("no recipe given");
        return -1;
    }
    return 0;
}

/* ---- the teacher first ------------------------------------------------------------------- */

/* Overrides that say where and how the processes run, not what is trained or for how long:
 * they apply to the teacher's run too. Anything else given for the student (train.epochs=2,
 * data.train_subset, name, ...) would silently change the teacher: teacher_run.<key> says it
 * for the teacher. An entry ending in '.' covers its whole section. */
static const char *const teacher_shared_keys[] = {"data.dir",
                                                  "data.train_images",
                                                  "data.train_labels",
                                                  "data.test_images",
                                                  "data.test_labels",
                                                  "logging.",
                                                  "train.threads",
                                                  "cache.dir",
                                                  "cluster.bind",
                                                  "cluster.heartbeat_ms",
                                                  "cluster.heartbeat_timeout_ms",
                                                  "cluster.restream_timeout_ms",
                                                  "cluster.stream_hwm",
                                                  "cluster.shared_memory",
                                                  "cluster.restart_failed"};

static bool applies_to_teacher(const char *override) {
    size_t key_len = strcspn(override, "=");
    for (size_t i = 0; i < sizeof teacher_shared_keys / sizeof teacher_shared_keys[0]; i++) {
        const char *k = teacher_shared_keys[i];
        size_t n = strlen(k);
        if (k[n - 1] == '.' ? key_len > n && strncmp(override, k, n) == 0
                            : key_len == n && strncmp(override, k, n) == 0)
            return true;
    }
    return false;
}

/* path made absolute against the working directory, without ".", ".." or repeated slashes,
 * by text alone: the file it names need not exist yet. */
static void normalize_path(const char *path, char *out, size_t outlen) {
    char full[2 * KD_PATH_MAX + 2], cwd[KD_PATH_MAX];
    if (path[0] == '/' || !getcwd(cwd, sizeof cwd))
        snprintf(full, sizeof full, "%s", path);
    else
        snprintf(full, sizeof full, "%s/%s", cwd, path);
    size_t len = 0;
    out[0] = 0;
    for (char *save = NULL, *part = strtok_r(full, "/", &save); part;
         part = strtok_r(NULL, "/", &save)) {
        if (strcmp(part, ".") == 0) continue;
        if (strcmp(part, "..") == 0) {
            char *slash = strrchr(out, '/');
            len = slash ? (size_t)(slash - out) : 0;
            out[len] = 0;
            continue;
        }
        int n = snprintf(out + len, outlen - len, "/%s", part);
        if (n < 0 || (size_t)n >= outlen - len) break;
        len += (size_t)n;
    }
    if (len == 0) snprintf(out, outlen, "/");
}

static bool same_path(const char *a, const char *b) {
    char na[KD_PATH_MAX], nb[KD_PATH_MAX];
    normalize_path(a, na, sizeof na);
    normalize_path(b, nb, sizeof nb);
    return strcmp(na, nb) == 0;
}

/* "a=1 b=2" (truncated with "..." when long) */
static void join_overrides(const char *const *list, int n, char *out, size_t outlen) {
    size_t len = 0;
    out[0] = 0;
    for (int i = 0; i < n; i++) {
        int w = snprintf(out + len, outlen - len, "%s%s", i ? " " : "", list[i]);
        if (w < 0 || (size_t)w >= outlen - len) {
            if (outlen > 4) snprintf(out + outlen - 4, 4, "...");
            return;
        }
        len += (size_t)w;
    }
}

static int run_with_teacher(const plan_t *p, const kd_recipe_t *r, int depth);

/* The teacher's run: forwarded overrides first, the teacher_run. ones after (the last wins). */
static void teacher_plan(const plan_t *p, const kd_recipe_t *r, plan_t *t) {
    memset(t, 0, sizeof *t);
    t->recipe_path = r->teacher.recipe;
    for (int i = 0; i < p->n_overrides; i++)
        if (applies_to_teacher(p->overrides[i])) t->overrides[t->n_overrides++] = p->overrides[i];
    for (int i = 0; i < p->n_teacher_overrides; i++)
        t->overrides[t->n_overrides++] = p->teacher_overrides[i];
}

/* Says which overrides the teacher's run gets and which it does not. */
static void announce_teacher(const plan_t *p, const kd_recipe_t *r, const plan_t *t,
                             const char *dir) {
    char given[4096], kept[4096];
    const char *not_passed[CLI_RUN_MAX_OVERRIDES];
    int n_not = 0;
    for (int i = 0; i < p->n_overrides; i++)
        if (!applies_to_teacher(p->overrides[i])) not_passed[n_not++] = p->overrides[i];
    join_overrides(t->overrides, t->n_overrides, given, sizeof given);
    note("teacher.checkpoint %s does not exist: training the teacher first with `kdist run %s%s%s` "
         "(run directory %s)",
         r->teacher.checkpoint, t->recipe_path, t->n_overrides ? " " : "", given, dir);
    if (n_not) {
        join_overrides(not_passed, n_not, kept, sizeof kept);
        note("not passed to the teacher's run: %s (prefix an override with " TEACHER_PREFIX
             " to apply it to the teacher)",
             kept);
    }
}

/* When r distils from a teacher checkpoint that does not exist, trains it with teacher.recipe.
 * Returns 0 when the teacher is there (or not needed), 1 when its run failed, 2 when the recipes
 * do not say how to get it. */
static int ensure_teacher(const plan_t *p, const kd_recipe_t *r, int depth) {
    if (r->distill.loss.alpha <= 0 || r->cache.import[0]) {
        if (p->n_teacher_overrides)
            note("the " TEACHER_PREFIX " overrides are not used: %s",
                 r->cache.import[0] ? "the teacher's logits are imported (cache.import)"
                                    : "distill.alpha is 0, no teacher is needed");
        return 0;
    }
    if (!r->teacher.checkpoint[0]) {
        note("%s: distill.alpha is %g but teacher.checkpoint is empty: set teacher.checkpoint to "
             "the teacher's weights (safetensors) and teacher.recipe to the recipe that trains "
             "them, or cache.import to distil from imported logits",
             p->recipe_path, (double)r->distill.loss.alpha);
        return 2;
    }
    if (kd_file_exists(r->teacher.checkpoint)) {
        if (p->n_teacher_overrides)
            note("teacher.checkpoint %s exists: the " TEACHER_PREFIX
                 " overrides are not used (delete it to train the teacher again)",
                 r->teacher.checkpoint);
        return 0;
    }
    if (!r->teacher.recipe[0]) {
        note("%s: teacher.checkpoint %s does not exist and teacher.recipe is empty: set "
             "teacher.recipe to the recipe that trains the teacher (kdist run then trains it "
             "first), or train it yourself (kdist run TEACHER_RECIPE) and point "
             "teacher.checkpoint at its student.safetensors",
             p->recipe_path, r->teacher.checkpoint);
        return 2;
    }
    if (depth >= TEACHER_MAX_DEPTH) {
        note("%s: teachers that need teachers, %d deep (teacher.recipe %s): is there a cycle?",
             p->recipe_path, depth, r->teacher.recipe);
        return 2;
    }
    plan_t t;
    teacher_plan(p, r, &t);
    kd_recipe_t tr;
    char err[KD_ERR_LEN], dir[KD_PATH_MAX], weights[KD_PATH_MAX + 32];
    cli_run_spec_t spec = {t.recipe_path, t.overrides, t.n_overrides, NULL, false};
    if (kd_recipe_load(t.recipe_path, t.overrides, t.n_overrides, &tr, err, sizeof err) != 0 ||
        cli_run_dir(&spec, &tr, dir, sizeof dir, err, sizeof err) != 0) {
        note("teacher.recipe %s: %s", t.recipe_path, err);
        return 2;
    }
    snprintf(weights, sizeof weights, "%s/student.safetensors", dir);
    if (!same_path(weights, r->teacher.checkpoint)) {
        note("%s: teacher.checkpoint is %s, but teacher.recipe %s (name '%s', logging.runs_dir "
             "'%s') writes the teacher's weights to %s: set teacher.checkpoint=%s, or make the "
             "teacher's run write there (" TEACHER_PREFIX "name=..., " TEACHER_PREFIX
             "logging.runs_dir=...)",
             p->recipe_path, r->teacher.checkpoint, t.recipe_path, tr.name, tr.logging.runs_dir,
             weights, weights);
        return 2;
    }
    announce_teacher(p, r, &t, dir);
    int rc = run_with_teacher(&t, &tr, depth + 1);
    if (rc != 0) {
        note("the teacher's run %s failed (logs in %s/logs): %s does not start", dir, dir,
             p->recipe_path);
        return rc;
    }
    if (!kd_file_exists(r->teacher.checkpoint)) {
        note("the teacher's run %s completed but left no %s", dir, r->teacher.checkpoint);
        return 1;
    }
    note("teacher trained: %s", r->teacher.checkpoint);
    return 0;
}

/* The teacher first when needed, then the run. */
static int run_with_teacher(const plan_t *p, const kd_recipe_t *r, int depth) {
    int rc = ensure_teacher(p, r, depth);
    if (rc != 0) return rc;
    cli_run_spec_t spec = {p->recipe_path, p->overrides, p->n_overrides, p->run_dir, p->resume};
    return cli_run_cluster(&spec);
}

/* ---- the student alone ------------------------------------------------------------------- */

/* The resolved recipe less what cannot change a student trained with distill.alpha=0 (the
 * teacher, the loss's temperature and divergence, the cache, log verbosity, the endpoint): a
 * sweep over those reuses one baseline. Caller frees. */
static char *baseline_identity(const kd_recipe_t *r) {
    kd_recipe_t *c = kd_xmalloc(sizeof *c), *d = kd_xmalloc(sizeof *d);
    kd_recipe_defaults(d);
    *c = *r;
    c->teacher = d->teacher;
    c->distill = d->distill;
    c->distill.loss.alpha = r->distill.loss.alpha;
    c->cache = d->cache;
    memcpy(c->logging.level, d->logging.level, sizeof c->logging.level);
    memcpy(c->cluster.bind, d->cluster.bind, sizeof c->cluster.bind);
    char *yaml = kd_recipe_to_yaml(c);
    free(c);
    free(d);
    return yaml;
}

/* Whether dir holds a completed run of the same recipe (as baseline_identity sees it), with
 * its weights. */
static bool completed_same_run(const char *dir, const kd_recipe_t *want) {
    char path[KD_PATH_MAX + 32], err[KD_ERR_LEN];
    snprintf(path, sizeof path, "%s/student.safetensors", dir);
    if (!kd_file_exists(path)) return false;
    snprintf(path, sizeof path, "%s/summary.json", dir);
    json_t *summary = json_load_file(path, 0, NULL);
    const char *status = json_string_value(json_object_get(summary, "status"));
    bool done =
        status && (strcmp(status, "completed") == 0 || strcmp(status, "early_stopped") == 0);
    json_decref(summary);
    if (!done) return false;
    snprintf(path, sizeof path, "%s/recipe.yaml", dir);
    kd_recipe_t *had = kd_xmalloc(sizeof *had);
    bool same = false;
    if (kd_recipe_load(path, NULL, 0, had, err, sizeof err) == 0) {
        char *a = baseline_identity(had), *b = baseline_identity(want);
        same = strcmp(a, b) == 0;
        free(a);
        free(b);
    }
    free(had);
    return same;
}

/* The recipe again with distill.alpha=0 as <name>_alone (<run dir>_alone with --run-dir): its
 * plan, resolved recipe and directory. 0, or -1 with err set. */
static int baseline_plan(const plan_t *p, const kd_recipe_t *r, plan_t *b, kd_recipe_t *alone,
                         char *dir, size_t dirlen, char *err, size_t errlen) {
    static char name[KD_NAME_MAX + 16], run_dir[KD_PATH_MAX + 16];
    *b = *p;
    snprintf(name, sizeof name, "name=%s" ALONE_SUFFIX, r->name);
    b->overrides[b->n_overrides++] = "distill.alpha=0";
    b->overrides[b->n_overrides++] = name;
    b->resume = false;
    if (p->run_dir) {
        snprintf(run_dir, sizeof run_dir, "%s" ALONE_SUFFIX, p->run_dir);
        b->run_dir = run_dir;
    }
    cli_run_spec_t spec = {b->recipe_path, b->overrides, b->n_overrides, b->run_dir, false};
    if (kd_recipe_load(b->recipe_path, b->overrides, b->n_overrides, alone, err, errlen) != 0 ||
        cli_run_dir(&spec, alone, dir, dirlen, err, errlen) != 0)
        return -1;
    return 0;
}

/* Trains the student alone unless an identical run completed before. Its directory goes to
 * dir. 0 when it completed now or before, else the run's exit code. */
static int run_baseline(const plan_t *p, const kd_recipe_t *r, char *dir, size_t dirlen) {
    plan_t *b = kd_xmalloc(sizeof *b);
    kd_recipe_t *alone = kd_xmalloc(sizeof *alone);
    char err[KD_ERR_LEN];
    int rc = 2;
    if (baseline_plan(p, r, b, alone, dir, dirlen, err, sizeof err) != 0) {
        note("--baseline: %s", err);
        goto out;
    }
    cli_run_spec_t spec = {b->recipe_path, b->overrides, b->n_overrides, b->run_dir, false};
    if (completed_same_run(dir, alone)) {
        note("--baseline: reusing the student alone in %s: it completed with the same resolved "
             "recipe (delete that directory to train it again)",
             dir);
        rc = 0;
        goto out;
    }
    if (r->distill.loss.alpha <= 0)
        note("--baseline: distill.alpha is already 0: the baseline trains the same way");
    note("--baseline: training the student alone (distill.alpha=0) as '%s' in %s", alone->name,
         dir);
    rc = cli_run_cluster(&spec);
out:
    free(alone);
    free(b);
    return rc;
}

/* ---- the table --------------------------------------------------------------------------- */

static int compare(const kd_recipe_t *r, const char *dir, const char *alone_dir) {
    static char teacher_w[KD_PATH_MAX], alone_w[KD_PATH_MAX + 32], student_w[KD_PATH_MAX + 32];
    cli_compare_row_t rows[3];
    int n = 0;
    if ((r->teacher.n_layers > 0 || r->teacher.gpt.layers > 0) && r->teacher.checkpoint[0] &&
        kd_file_exists(r->teacher.checkpoint)) {
        snprintf(teacher_w, sizeof teacher_w, "%s", r->teacher.checkpoint);
        rows[n++] = (cli_compare_row_t){"teacher", "teacher", teacher_w, true, NULL};
    } else {
        note("no teacher row in the table: %s",
             r->cache.import[0] ? "the logits were imported (cache.import)"
                                : "the recipe names no teacher weights that exist");
    }
    if (alone_dir) {
        snprintf(alone_w, sizeof alone_w, "%s/student.safetensors", alone_dir);
        rows[n++] =
            (cli_compare_row_t){"student alone", "student_alone", alone_w, false, alone_dir};
    }
    snprintf(student_w, sizeof student_w, "%s/student.safetensors", dir);
    bool distilled = r->distill.loss.alpha > 0;
    rows[n++] = (cli_compare_row_t){distilled ? "distilled student" : "student (alpha 0)",
                                    distilled ? "distilled" : "student", student_w, false, dir};
    char json_path[KD_PATH_MAX + 32], err[KD_ERR_LEN];
    snprintf(json_path, sizeof json_path, "%s/comparison.json", dir);
    if (cli_compare(r, rows, n, json_path, err, sizeof err) != 0) {
        note("comparison: %s", err);
        return 1;
    }
    return 0;
}

/* The table is for runs that have something to be compared with: a teacher, or a baseline. */
static bool wants_table(const plan_t *p, const kd_recipe_t *r) {
    return p->baseline || r->distill.loss.alpha > 0 ||
           ((r->teacher.n_layers > 0 || r->teacher.gpt.layers > 0) && r->teacher.checkpoint[0] &&
            kd_file_exists(r->teacher.checkpoint));
}

int kd_cmd_run(int argc, char **argv) {
    plan_t *p = kd_xcalloc(1, sizeof *p);
    kd_recipe_t *r = kd_xmalloc(sizeof *r);
    char err[KD_ERR_LEN], dir[KD_PATH_MAX], alone_dir[KD_PATH_MAX];
    int rc = 2;
    if (parse_args(p, argc, argv) != 0) {
        usage(stderr);
        goto out;
    }
    cli_run_spec_t spec = {p->recipe_path, p->overrides, p->n_overrides, p->run_dir, p->resume};
    if (kd_recipe_load(p->recipe_path, p->overrides, p->n_overrides, r, err, sizeof err) != 0 ||
        cli_run_dir(&spec, r, dir, sizeof dir, err, sizeof err) != 0) {
        note("%s", err);
        goto out;
    }
    if (p->baseline) { /* a baseline that cannot even load says so before any training */
        plan_t *b = kd_xmalloc(sizeof *b);
        kd_recipe_t *alone = kd_xmalloc(sizeof *alone);
        int bad = baseline_plan(p, r, b, alone, alone_dir, sizeof alone_dir, err, sizeof err);
        free(alone);
        free(b);
        if (bad) {
            note("--baseline: %s", err);
            goto out;
        }
    }
    if ((rc = run_with_teacher(p, r, 0)) != 0) goto out;
    if (p->baseline && (rc = run_baseline(p, r, alone_dir, sizeof alone_dir)) != 0) goto out;
    if (cli_run_interrupted()) {
        rc = 1;
        goto out;
    }
    if (wants_table(p, r)) rc = compare(r, dir, p->baseline ? alone_dir : NULL);
out:
    free(r);
    free(p);
    return rc;
}
