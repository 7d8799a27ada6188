/* test_distill_cli: `kdist run` around a distillation, as a user runs it. A distillation whose
 * teacher.checkpoint is missing trains the teacher first with teacher.recipe (overrides given for
 * the student do not reach it, teacher_run.* ones do); --baseline trains the student alone as
 * <name>_alone, or reuses an identical completed one; the run ends with the comparison table
 * (teacher, student alone, distilled student) on stdout and in comparison.json. A missing
 * teacher without teacher.recipe, and a teacher.recipe that would write elsewhere, are errors
 * that name the keys and the fix before anything is trained. Tiny MLPs on small subsets.
 * Spawns processes. */
#include <jansson.h>
#include <string.h>

#include "kd_test.h"
#include "kd_test_cluster.h"
#include "kd_util.h"

#define RUN_DEADLINE 300.0 /* seconds for one `kdist run` pipeline */

static char kdist[KD_PATH_MAX];
static char tmp[KD_PATH_MAX];
static char out_buf[1 << 17];

/* The teacher: a 784-256-10 MLP trained on labels. Its file trains 1 epoch of 3000 samples. */
static const char *teacher_text = "name: dc_teacher\n"
                                  "seed: 2\n"
                                  "data: {train_subset: 3000, val_size: 500, test_subset: 500}\n"
                                  "student:\n"
                                  "  layers:\n"
                                  "    - {type: flatten}\n"
                                  "    - {type: linear, out_features: 256}\n"
                                  "    - {type: relu}\n"
                                  "    - {type: linear, out_features: 10}\n"
                                  "distill: {alpha: 0.0}\n"
                                  "optim: {name: sgd, lr: 0.05, momentum: 0.9}\n"
                                  "schedule: {name: constant}\n"
                                  "train: {epochs: 1, batch_size: 128, threads: 1}\n"
                                  "cluster: {workers: 1, teachers: 1}\n";

#define TEACHER_PARAMS (784 * 256 + 256 + 256 * 10 + 10)
#define STUDENT_PARAMS (784 * 32 + 32 + 32 * 10 + 10)

/* The distillation into a 784-32-10 MLP; teacher.checkpoint and teacher.recipe are appended. */
static const char *distill_text = "name: dc_distill\n"
                                  "seed: 3\n"
                                  "data: {train_subset: 3000, val_size: 500, test_subset: 500}\n"
                                  "student:\n"
                                  "  layers:\n"
                                  "    - {type: flatten}\n"
                                  "    - {type: linear, out_features: 32}\n"
                                  "    - {type: relu}\n"
                                  "    - {type: linear, out_features: 10}\n"
                                  "distill: {loss: forward_kl, temperature: 4, alpha: 0.9}\n"
                                  "optim: {name: sgd, lr: 0.05, momentum: 0.9}\n"
                                  "schedule: {name: constant}\n"
                                  "train: {epochs: 1, batch_size: 128, threads: 1}\n"
                                  "cluster: {workers: 1, teachers: 1}\n"
                                  "teacher:\n"
                                  "  layers:\n"
                                  "    - {type: flatten}\n"
                                  "    - {type: linear, out_features: 256}\n"
                                  "    - {type: relu}\n"
                                  "    - {type: linear, out_features: 10}\n";

/* Writes the distillation recipe with these teacher keys (NULL: left out) to path. */
static void write_distill(const char *path, const char *checkpoint, const char *teacher_recipe) {
    char text[8192];
    int n = snprintf(text, sizeof text, "%s", distill_text);
    if (checkpoint) n += snprintf(text + n, sizeof text - n, "  checkpoint: \"%s\"\n", checkpoint);
    if (teacher_recipe)
        n += snprintf(text + n, sizeof text - n, "  recipe: \"%s\"\n", teacher_recipe);
    /* the logit cache in the test's directory, not in the working directory */
    n += snprintf(text + n, sizeof text - n, "cache:\n  dir: \"%s/cache\"\n", tmp);
    kd_test_write_text(path, text);
}

/* Runs kdist with args (NULL-terminated after the recipe) to completion; output (stdout and
 * stderr) in out_buf. Returns the exit code, -1 past the deadline. */
static int run_kdist(char *const argv[]) {
    char log[KD_PATH_MAX + 32];
    snprintf(log, sizeof log, "%s/out.txt", tmp);
    return kd_test_capture_wait(argv, log, RUN_DEADLINE, out_buf, sizeof out_buf);
}

static json_t *load_json(const char *dir, const char *file) {
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    return json_load_file(path, 0, NULL);
}

/* A table row: a line that starts with label followed by spaces and holds a percentage. */
static bool has_row(const char *text, const char *label) {
    size_t n = strlen(label);
    for (const char *line = text; *line;) {
        const char *end = strchr(line, '\n');
        if (strncmp(line, label, n) == 0 && line[n] == ' ') {
            const char *pct = strchr(line, '%');
            if (pct && (!end || pct < end)) return true;
        }
        if (!end) break;
        line = end + 1;
    }
    return false;
}

/* comparison.json in dir has these row keys in this order, each measured sensibly. */
static void check_comparison(const char *dir, const char *const *keys, const long *params, int n) {
    json_t *c = load_json(dir, "comparison.json");
    CHECK(json_is_object(c));
    json_t *rows = json_object_get(c, "rows");
    CHECK(json_array_size(rows) == (size_t)n);
    CHECK(json_integer_value(json_object_get(c, "test_samples")) == 500);
    CHECK(json_integer_value(json_object_get(c, "batch_size")) == 256);
    for (int i = 0; i < n && i < (int)json_array_size(rows); i++) {
        json_t *row = json_array_get(rows, (size_t)i);
        const char *key = json_string_value(json_object_get(row, "model"));
        CHECK(key && strcmp(key, keys[i]) == 0);
        double acc = json_number_value(json_object_get(row, "test_accuracy"));
        CHECK(acc > 0.3 && acc <= 1.0); /* trained: chance is 0.1 */
        json_int_t p = json_integer_value(json_object_get(row, "parameters"));
        CHECK(p == params[i]);
        json_int_t bytes = json_integer_value(json_object_get(row, "size_bytes"));
        CHECK(bytes >= 4 * p && bytes < 4 * p + 65536); /* float32 weights plus the header */
        CHECK(json_number_value(json_object_get(row, "inference_samples_per_sec")) > 0);
        if (!key || strcmp(key, keys[i]) != 0 || !(acc > 0.3))
            fprintf(stderr, "row %d: model %s, accuracy %.3f\n", i, key ? key : "?", acc);
    }
    json_decref(c);
}

/* Missing teacher weights and no recipe to train them: exit 2 before anything runs, naming
 * teacher.checkpoint (with its path) and teacher.recipe. */
static void test_missing_teacher_without_recipe(const char *runs_arg) {
    char recipe[KD_PATH_MAX + 32], ckpt[KD_PATH_MAX + 32];
    snprintf(recipe, sizeof recipe, "%s/no_recipe.yaml", tmp);
    snprintf(ckpt, sizeof ckpt, "%s/nowhere/teacher.safetensors", tmp);
    write_distill(recipe, ckpt, NULL);
    char *argv[] = {kdist, "run", recipe, (char *)runs_arg, NULL};
    CHECK(run_kdist(argv) == 2);
    CHECK_ERR_HAS(out_buf, "teacher.checkpoint");
    CHECK_ERR_HAS(out_buf, ckpt);
    CHECK_ERR_HAS(out_buf, "teacher.recipe is empty");
    char dir[KD_PATH_MAX + 64];
    snprintf(dir, sizeof dir, "%s/runs/dc_distill", tmp);
    CHECK(!kd_file_exists(dir)); /* nothing started */

    /* No teacher at all for a distillation: the same kind of error. */
    write_distill(recipe, NULL, NULL);
    CHECK(run_kdist(argv) == 2);
    CHECK_ERR_HAS(out_buf, "teacher.checkpoint is empty");
}

/* teacher.recipe writes its weights somewhere else than teacher.checkpoint: said at once, with
 * the path to set, before the teacher trains. */
static void test_teacher_paths_disagree(const char *runs_arg, const char *teacher_recipe) {
    char recipe[KD_PATH_MAX + 32], ckpt[KD_PATH_MAX + 32], want[KD_PATH_MAX + 64];
    snprintf(recipe, sizeof recipe, "%s/elsewhere.yaml", tmp);
    snprintf(ckpt, sizeof ckpt, "%s/elsewhere/student.safetensors", tmp);
    snprintf(want, sizeof want, "teacher.checkpoint=%s/runs/dc_teacher/student.safetensors", tmp);
    write_distill(recipe, ckpt, teacher_recipe);
    char *argv[] = {kdist, "run", recipe, (char *)runs_arg, NULL};
    CHECK(run_kdist(argv) == 2);
    CHECK_ERR_HAS(out_buf, ckpt);
    CHECK_ERR_HAS(out_buf, want);
    CHECK_ERR_HAS(out_buf, "teacher_run.name");
    char dir[KD_PATH_MAX + 64];
    snprintf(dir, sizeof dir, "%s/runs/dc_teacher", tmp);
    CHECK(!kd_file_exists(dir));
}

/* The whole pipeline: teacher first (teacher_run.* reaches it, the student's train.epochs=2
 * does not), the distillation, the student alone, the three-row table. */
static void test_teacher_first(const char *runs_arg, const char *recipe) {
    char teacher_dir[KD_PATH_MAX + 64], dir[KD_PATH_MAX + 64], alone[KD_PATH_MAX + 64];
    snprintf(teacher_dir, sizeof teacher_dir, "%s/runs/dc_teacher", tmp);
    snprintf(dir, sizeof dir, "%s/runs/dc_distill", tmp);
    snprintf(alone, sizeof alone, "%s/runs/dc_distill_alone", tmp);
    char *argv[] = {kdist,
                    "run",
                    (char *)recipe,
                    (char *)runs_arg,
                    "train.epochs=2",
                    "teacher_run.data.train_subset=2500",
                    "--baseline",
                    NULL};
    int rc = run_kdist(argv);
    CHECK_ERR_HAS(out_buf, "training the teacher first");
    CHECK_ERR_HAS(out_buf, "not passed to the teacher's run: train.epochs=2");

    /* The teacher's own run: its recipe's single epoch, the teacher_run. subset. */
    CHECK(kd_test_exists_in(teacher_dir, "student.safetensors"));
    json_t *ts = load_json(teacher_dir, "summary.json");
    const char *status = json_string_value(json_object_get(ts, "status"));
    CHECK(status && strcmp(status, "completed") == 0);
    CHECK(json_integer_value(json_object_get(ts, "epochs")) == 1);
    CHECK(json_integer_value(json_object_get(json_object_get(ts, "ledger"), "batches_expected")) ==
          (2000 + 127) / 128); /* 2500 samples less the 500 held out */
    json_decref(ts);

    /* The distillation and its baseline (this needs teacher logits over the stream). */
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "kdist run said:\n%s\n", out_buf);
    json_t *s = load_json(dir, "summary.json");
    CHECK(json_integer_value(json_object_get(s, "epochs")) == 2);
    json_decref(s);
    CHECK(kd_test_exists_in(alone, "student.safetensors"));
    CHECK(has_row(out_buf, "teacher"));
    CHECK(has_row(out_buf, "student alone"));
    CHECK(has_row(out_buf, "distilled student"));
    const char *keys[] = {"teacher", "student_alone", "distilled"};
    const long params[] = {TEACHER_PARAMS, STUDENT_PARAMS, STUDENT_PARAMS};
    check_comparison(dir, keys, params, 3);
}

/* With the teacher there: a run at distill.alpha=0 with --baseline trains the student alone and
 * shows three rows; the same command again reuses that baseline and says so. */
static void test_table_and_reuse(const char *runs_arg, const char *recipe) {
    char dir[KD_PATH_MAX + 64], alone[KD_PATH_MAX + 64], name[] = "name=dc_plain";
    snprintf(dir, sizeof dir, "%s/runs/dc_plain", tmp);
    snprintf(alone, sizeof alone, "%s/runs/dc_plain_alone", tmp);
    char *argv[] = {kdist,        "run", (char *)recipe, (char *)runs_arg, name, "distill.alpha=0",
                    "--baseline", NULL};
    int rc = run_kdist(argv);
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "kdist run said:\n%s\n", out_buf);
    CHECK_ERR_HAS(out_buf, "training the student alone");
    CHECK(kd_test_exists_in(alone, "student.safetensors"));
    CHECK(has_row(out_buf, "teacher"));
    CHECK(has_row(out_buf, "student alone"));
    CHECK(has_row(out_buf, "student (alpha 0)"));
    const char *keys[] = {"teacher", "student_alone", "student"};
    const long params[] = {TEACHER_PARAMS, STUDENT_PARAMS, STUDENT_PARAMS};
    check_comparison(dir, keys, params, 3);

    /* Same resolved recipe (a temperature cannot change a student trained at alpha 0). */
    char *again[] = {kdist,
                     "run",
                     (char *)recipe,
                     (char *)runs_arg,
                     name,
                     "distill.alpha=0",
                     "distill.temperature=2",
                     "--baseline",
                     NULL};
    rc = run_kdist(again);
    CHECK(rc == 0);
    CHECK_ERR_HAS(out_buf, "reusing the student alone");
    CHECK(strstr(out_buf, "training the student alone") == NULL);
    CHECK(has_row(out_buf, "student alone"));
    check_comparison(dir, keys, params, 3);

    /* A different recipe trains it again. */
    char *changed[] = {kdist,
                       "run",
                       (char *)recipe,
                       (char *)runs_arg,
                       name,
                       "distill.alpha=0",
                       "optim.lr=0.04",
                       "--baseline",
                       NULL};
    CHECK(run_kdist(changed) == 0);
    CHECK_ERR_HAS(out_buf, "training the student alone");
}

int main(void) {
    snprintf(kdist, sizeof kdist, "%s", kd_test_bin("kdist"));
    snprintf(tmp, sizeof tmp, "%s", kd_test_tmpdir("test_distill_cli"));
    char teacher_recipe[KD_PATH_MAX + 32], recipe[KD_PATH_MAX + 32], ckpt[KD_PATH_MAX + 64];
    char runs_arg[KD_PATH_MAX + 64];
    snprintf(teacher_recipe, sizeof teacher_recipe, "%s/teacher.yaml", tmp);
    snprintf(recipe, sizeof recipe, "%s/distill.yaml", tmp);
    snprintf(ckpt, sizeof ckpt, "%s/runs/dc_teacher/student.safetensors", tmp);
    /* Forwarded to the teacher's run too: both land in tmp/runs. */
    snprintf(runs_arg, sizeof runs_arg, "logging.runs_dir=%s/runs", tmp);
    kd_test_write_text(teacher_recipe, teacher_text);
    write_distill(recipe, ckpt, teacher_recipe);

    test_missing_teacher_without_recipe(runs_arg);
    test_teacher_paths_disagree(runs_arg, teacher_recipe);
    test_teacher_first(runs_arg, recipe);
    if (kd_file_exists(ckpt)) test_table_and_reuse(runs_arg, recipe);
    return kd_test_done("test_distill_cli");
}
