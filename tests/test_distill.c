/* test_distill: distillation over the stream with the persistent logit cache (DESIGN §4), with
 * real processes on loopback. A small CNN teacher is trained in-process first; then:
 *   1. a run on a cold cache computes every sample once (forward_samples = N, one miss per
 *      block); the same run again computes nothing and is bit for bit the same student (sync,
 *      one worker); a sweep over T and alpha computes nothing; a teacher with one float nudged,
 *      or another training split, gets a new entry and is computed;
 *   2. `kdist cache verify` finds a byte flipped inside a block, names entry and block; the
 *      next run recomputes that block (cache_corrupt) and verify passes again;
 *   3. `kdist cache export` equals `kdist eval --model teacher --split train --dump-logits`
 *      (the same training split, other batch sizes: last bits only);
 *   4. the data fingerprint a user needs for `kdist cache import` is printed by a run that asks
 *      for a missing import; imported logits distil with no teacher weights present;
 *   5. two teacher nodes fill one cold cache at once, one is SIGKILLed mid-fill: the run
 *      completes with every batch applied once, `kdist cache verify` passes, and the entry holds
 *      exactly the teacher's logits.
 * Spawns processes. */
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>

#include "kd_cache.h"
#include "kd_checkpoint.h"
#include "kd_npy.h"
#include "kd_test.h"
#include "kd_test_cluster.h"
#include "kd_train.h"
#include "kd_util.h"

#define SUBSET        8000
#define VAL_SIZE      500
#define N_TRAIN       (SUBSET - VAL_SIZE) /* 7500 */
#define BLOCK_ROWS    KD_CACHE_DEFAULT_BLOCK_ROWS
#define N_BLOCKS      ((N_TRAIN + BLOCK_ROWS - 1) / BLOCK_ROWS) /* 30 */
#define N_BATCHES     ((N_TRAIN + 127) / 128)                   /* 59 */
#define SUBSET_2      7000                                      /* another training split */
#define N_TRAIN_2     (SUBSET_2 - VAL_SIZE)
#define N_CLASSES     10
#define CORRUPT_BLOCK 7
#define RUN_SECONDS   180.0 /* a run's deadline (a healthy one takes a few seconds) */
#define CLI_SECONDS   120.0
#define MAX_ARGS      48
#define MAX_NODES     4
/* The import must teach as well as the teacher itself: its logits differ in the last bits
 * only, which moves a 1000-sample test accuracy by a few samples at most. */
#define IMPORT_ACCURACY_TOL 0.01

/* The teacher: conv 3x3 x8 -> relu -> maxpool 2 -> linear 10, one epoch on the subset. */
#define TEACHER_LAYERS                                                                             \
    "  layers:\n"                                                                                  \
    "    - {type: conv2d, out_channels: 8, kernel: 3, padding: 1}\n"                               \
    "    - {type: relu}\n"                                                                         \
    "    - {type: maxpool2d, kernel: 2}\n"                                                         \
    "    - {type: flatten}\n"                                                                      \
    "    - {type: linear, out_features: 10}\n"

#define COMMON                                                                                     \
    "data: {train_subset: 8000, val_size: 500, test_subset: 1000}\n"                               \
    "optim: {name: sgd, lr: 0.05, momentum: 0.9}\n"                                                \
    "schedule: {name: constant}\n"                                                                 \
    "train: {epochs: 1, batch_size: 128, threads: 1}\n"

static const char *teacher_text = "name: td_teacher\n"
                                  "seed: 2\n" COMMON "distill: {alpha: 0.0}\n"
                                  "student:\n" TEACHER_LAYERS;

/* The distillation into a 784-128-10 MLP; the teacher's checkpoint and the cache are appended. */
static const char *distill_text =
    "name: td_distill\n"
    "seed: 1\n" COMMON "distill: {loss: forward_kl, temperature: 4, alpha: 0.9}\n"
    "student:\n"
    "  layers:\n"
    "    - {type: flatten}\n"
    "    - {type: linear, out_features: 128}\n"
    "    - {type: relu}\n"
    "    - {type: linear, out_features: 10}\n"
    "cluster: {workers: 1, teachers: 1, consistency: sync}\n"
    "teacher:\n"
    "  batch_size: 256\n" TEACHER_LAYERS;

static char tmp[KD_PATH_MAX];
static char recipe[KD_PATH_MAX + 32];       /* the distillation */
static char teacher_ckpt[KD_PATH_MAX + 32]; /* the trained teacher */
static char cache_dir[KD_PATH_MAX + 32];
static char out_buf[1 << 17]; /* the last kdist command's output */

/* ---- small helpers ------------------------------------------------------------------------- */

/* Runs `kdist ARGS...` (NULL-terminated) to completion; its stdout and stderr in out_buf.
 * Returns the exit code, -1 past the deadline. */
static int kdist_cmd(const char *first, ...) {
    char *argv[MAX_ARGS];
    int argc = 0;
    argv[argc++] = (char *)kd_test_bin("kdist");
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && argc < MAX_ARGS - 1; a = va_arg(ap, const char *))
        argv[argc++] = (char *)a;
    va_end(ap);
    argv[argc] = NULL;
    char log[KD_PATH_MAX + 32];
    snprintf(log, sizeof log, "%s/kdist.out", tmp);
    return kd_test_capture_wait(argv, log, CLI_SECONDS, out_buf, sizeof out_buf);
}

/* The number of entries `kdist cache ls` lists (its last line, "N entr(y|ies), ..."). */
static long cache_ls_count(const char *dir) {
    if (kdist_cmd("cache", "ls", "--dir", dir, NULL) != 0) return -1;
    if (strstr(out_buf, "no cache entries")) return 0;
    const char *last = NULL;
    for (const char *p = out_buf; (p = strstr(p, " entr")); p++) last = p;
    if (!last) return -1;
    const char *start = last;
    while (start > out_buf && start[-1] >= '0' && start[-1] <= '9') start--;
    return start < last ? strtol(start, NULL, 10) : -1;
}

/* The entries under dir, from the library (sorted by name). Caller frees. */
static kd_cache_entry_info_t *list_entries(const char *dir, size_t *n) {
    kd_cache_entry_info_t *list = NULL;
    char err[KD_ERR_LEN];
    *n = 0;
    if (kd_cache_list(dir, &list, n, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return NULL;
    }
    return list;
}

/* ---- the cluster --------------------------------------------------------------------------- */

typedef struct {
    char name[64], dir[KD_PATH_MAX + 64], endpoint[256], name_arg[96];
    const char *overrides[16];
    int n_overrides;
    pid_t coord, teachers[MAX_NODES], workers[MAX_NODES];
    int n_teachers, n_workers;
    char coord_log[KD_PATH_MAX + 128], teacher_log[MAX_NODES][KD_PATH_MAX + 128],
        worker_log[MAX_NODES][KD_PATH_MAX + 128];
} cluster_t;

static int add_overrides(const cluster_t *c, char **argv, int argc) {
    return kd_test_add_overrides(argv, argc, c->name_arg, c->overrides, c->n_overrides);
}

/* Starts the coordinator (and waits until it listens), then the teacher nodes and the
 * workers. overrides: NULL-terminated (may be NULL). */
static bool cluster_start(cluster_t *c, const char *name, int teachers, int workers,
                          const char *const *overrides) {
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", name);
    snprintf(c->dir, sizeof c->dir, "%s/runs/%s", tmp, name);
    snprintf(c->name_arg, sizeof c->name_arg, "name=%s", name);
    c->n_overrides = kd_test_take_overrides(c->overrides, 16, overrides);
    char logs[KD_PATH_MAX + 80];
    snprintf(logs, sizeof logs, "%s/logs", c->dir);
    if (!kd_test_make_dirs(logs)) {
        CHECK(false);
        return false;
    }
    char *argv[MAX_ARGS];
    int argc = kd_test_coordinator_argv(argv, recipe, c->dir);
    add_overrides(c, argv, argc);
    snprintf(c->coord_log, sizeof c->coord_log, "%s/coordinator-0.log", logs);
    c->coord = kd_test_spawn(argv, c->coord_log);
    CHECK(c->coord > 0);
    char endpoint_file[KD_PATH_MAX + 100];
    snprintf(endpoint_file, sizeof endpoint_file, "%s/coordinator.endpoint", c->dir);
    bool up = c->coord > 0 && kd_test_wait_file(endpoint_file, 60) &&
              kd_test_read_text(endpoint_file, c->endpoint, sizeof c->endpoint) && c->endpoint[0];
    CHECK(up);
    if (!up) {
        kd_test_show_log(c->coord_log);
        if (c->coord > 0) kd_test_wait(c->coord, 1);
        c->coord = 0;
        return false;
    }
    for (int t = 0; t < teachers; t++) {
        char id[16];
        snprintf(id, sizeof id, "%d", t);
        argc = kd_test_teacher_argv(argv, c->endpoint, id, recipe);
        add_overrides(c, argv, argc);
        snprintf(c->teacher_log[t], sizeof c->teacher_log[t], "%s/teacher-%d.log", logs, t);
        c->teachers[t] = kd_test_spawn(argv, c->teacher_log[t]);
        CHECK(c->teachers[t] > 0);
        c->n_teachers++;
    }
    for (int w = 0; w < workers; w++) {
        char id[16];
        snprintf(id, sizeof id, "%d", w);
        char *wargv[] = {
            (char *)kd_test_bin("kdist-worker"), "--coordinator", c->endpoint, "--id", id, NULL};
        snprintf(c->worker_log[w], sizeof c->worker_log[w], "%s/worker-%d.log", logs, w);
        c->workers[w] = kd_test_spawn(wargv, c->worker_log[w]);
        CHECK(c->workers[w] > 0);
        c->n_workers++;
    }
    return true;
}

/* Waits for the coordinator, then every node still running (each must exit 0 unless the test
 * killed it: pid 0); returns summary.json (caller decrefs) or NULL. */
static json_t *cluster_finish(cluster_t *c) {
    int rc = c->coord > 0 ? kd_test_wait(c->coord, RUN_SECONDS) : -1;
    CHECK(rc == 0);
    if (rc != 0) {
        fprintf(stderr, "%s: the coordinator exited with %d\n", c->name, rc);
        kd_test_show_log(c->coord_log);
    }
    for (int t = 0; t < c->n_teachers; t++) {
        if (c->teachers[t] <= 0) continue;
        int node_rc = kd_test_wait(c->teachers[t], 30);
        CHECK(node_rc == 0);
        if (node_rc != 0) kd_test_show_log(c->teacher_log[t]);
    }
    for (int w = 0; w < c->n_workers; w++) {
        if (c->workers[w] <= 0) continue;
        int node_rc = kd_test_wait(c->workers[w], 30);
        CHECK(node_rc == 0);
        if (node_rc != 0) kd_test_show_log(c->worker_log[w]);
    }
    char path[KD_PATH_MAX + 100];
    snprintf(path, sizeof path, "%s/summary.json", c->dir);
    json_t *summary = json_load_file(path, 0, NULL);
    CHECK(summary != NULL);
    if (!summary) fprintf(stderr, "%s: no summary at %s\n", c->name, path);
    return summary;
}

/* A whole run: one teacher node and one worker unless said otherwise. */
static json_t *run(cluster_t *c, const char *name, const char *const *overrides) {
    double t0 = kd_test_now();
    if (!cluster_start(c, name, 1, 1, overrides)) return NULL;
    json_t *s = cluster_finish(c);
    fprintf(stderr, "%s: %.1f s\n", name, kd_test_now() - t0);
    return s;
}

static long jint(json_t *j, const char *key) {
    return (long)json_integer_value(json_object_get(j, key));
}

static long teacher_stat(json_t *summary, const char *key) {
    return jint(json_object_get(summary, "teacher"), key);
}

static double accuracy(json_t *summary) {
    return json_number_value(json_object_get(summary, "test_accuracy"));
}

/* The teacher's logit work: forward samples and cache blocks (-1 in an expectation: any). */
typedef struct {
    long forward, hits, misses, corrupt;
} work_t;

/* What teacher node t says it did, in its exit line (TEACHER-LOGITS ...); false if absent. */
static bool node_work(const cluster_t *c, int t, work_t *w) {
    static char text[1 << 18];
    if (!kd_test_read_text(c->teacher_log[t], text, sizeof text)) return false;
    const char *p = strstr(text, " samples through the teacher");
    while (p && p > text && p[-1] >= '0' && p[-1] <= '9') p--; /* back to the number */
    long on_demand;
    return p && sscanf(p,
                       "%ld samples through the teacher (%ld on demand); cache blocks: %ld hits, "
                       "%ld misses, %ld corrupt",
                       &w->forward, &on_demand, &w->hits, &w->misses, &w->corrupt) == 5;
}

static work_t summary_work(json_t *s) {
    return (work_t){teacher_stat(s, "forward_samples"), teacher_stat(s, "cache_hits"),
                    teacher_stat(s, "cache_misses"), teacher_stat(s, "cache_corrupt")};
}

static bool work_is(work_t got, work_t want) {
    return (want.forward < 0 || got.forward == want.forward) &&
           (want.hits < 0 || got.hits == want.hits) &&
           (want.misses < 0 || got.misses == want.misses) &&
           (want.corrupt < 0 || got.corrupt == want.corrupt);
}

/* A run with one teacher node: what the node did (its log) is what was expected, and the
 * summary reports the same. */
static void check_work(const cluster_t *c, json_t *s, work_t want) {
    work_t node = {-1, -1, -1, -1}, sum = summary_work(s);
    bool logged = node_work(c, 0, &node);
    fprintf(stderr,
            "%s: teacher node: %ld forward samples, %ld hits, %ld misses, %ld corrupt; "
            "summary.json: %ld, %ld, %ld, %ld; test accuracy %.4f\n",
            c->name, node.forward, node.hits, node.misses, node.corrupt, sum.forward, sum.hits,
            sum.misses, sum.corrupt, accuracy(s));
    CHECK(logged);
    CHECK(work_is(node, want));
    CHECK(work_is(sum, want));
    CHECK(work_is(sum, node));
}

/* Completed, every batch of the one epoch applied exactly once. */
static void check_whole(const char *name, json_t *s, long n_batches) {
    if (!s) return;
    json_t *ledger = json_object_get(s, "ledger");
    const char *status = json_string_value(json_object_get(s, "status"));
    CHECK(status && strcmp(status, "completed") == 0);
    CHECK(jint(ledger, "batches_expected") == n_batches);
    CHECK(jint(ledger, "batches_applied") == n_batches);
    CHECK(jint(ledger, "duplicates_dropped") == 0);
    CHECK(jint(s, "epochs") == 1);
    double acc = accuracy(s);
    CHECK(acc > 0.5 && acc <= 1.0); /* trained: chance is 0.1 */
    if (!status || strcmp(status, "completed") != 0 || jint(ledger, "batches_applied") != n_batches)
        fprintf(stderr, "%s: status %s, %ld/%ld batches applied (%ld expected)\n", name,
                status ? status : "?", jint(ledger, "batches_applied"), n_batches,
                jint(ledger, "batches_expected"));
}

static void student_path(const cluster_t *c, char *out, size_t outlen) {
    snprintf(out, outlen, "%s/student.safetensors", c->dir);
}

/* ---- the teacher ----------------------------------------------------------------------------- */

/* Trains the small CNN teacher in this process and saves it; returns its test accuracy. */
static double train_teacher(void) {
    char path[KD_PATH_MAX + 32], err[KD_ERR_LEN];
    snprintf(path, sizeof path, "%s/teacher.yaml", tmp);
    kd_test_write_text(path, teacher_text);
    kd_recipe_t r;
    kd_splits_t d = {0};
    kd_model_t *m = NULL;
    kd_train_result_t res = {0};
    kd_set_threads(1);
    double t0 = kd_test_now();
    bool ok = kd_recipe_load(path, NULL, 0, &r, err, sizeof err) == 0 &&
              kd_splits_load(&r, &d, err, sizeof err) == 0 &&
              kd_model_from_recipe(&r, false, d.train, &m, err, sizeof err) == 0 &&
              kd_train_local(&r, m, NULL, &d, NULL, NULL, &res, err, sizeof err) == 0 &&
              kd_checkpoint_save(m, teacher_ckpt, err, sizeof err) == 0;
    CHECK(ok);
    if (!ok) {
        fprintf(stderr, "training the teacher: %s\n", err);
        exit(1);
    }
    fprintf(stderr, "teacher: %zu parameters, test accuracy %.4f after %ld steps (%.1f s)\n",
            m->n_params, res.test.accuracy, res.steps, kd_test_now() - t0);
    kd_model_destroy(&m);
    kd_splits_destroy(&d);
    return res.test.accuracy;
}

/* A copy of the teacher with one float moved by one ulp. */
static void nudge_teacher(const char *out_path) {
    char err[KD_ERR_LEN];
    kd_recipe_t r;
    kd_splits_t d = {0};
    kd_model_t *m = NULL;
    bool ok = kd_recipe_load(recipe, NULL, 0, &r, err, sizeof err) == 0 &&
              kd_splits_load(&r, &d, err, sizeof err) == 0 &&
              kd_model_from_recipe(&r, true, d.train, &m, err, sizeof err) == 0 &&
              kd_checkpoint_load(m, teacher_ckpt, err, sizeof err) == 0;
    CHECK(ok);
    if (ok) {
        m->params[m->n_params / 2] = nextafterf(m->params[m->n_params / 2], INFINITY);
        CHECK(kd_checkpoint_save(m, out_path, err, sizeof err) == 0);
    } else {
        fprintf(stderr, "nudging the teacher: %s\n", err);
    }
    kd_model_destroy(&m);
    kd_splits_destroy(&d);
}

/* ---- 1. computed once, reused by runs and sweeps; new teacher or data, new entry ----------- */

static char entry_a[KD_CACHE_NAME_MAX]; /* the teacher on the training split */
static char student_a[KD_PATH_MAX + 128];
static double accuracy_a = -1;

static void test_computed_once(void) {
    cluster_t c;
    /* A cold cache: every sample through the teacher once, one miss per block. */
    json_t *a = run(&c, "cold", NULL);
    if (!a) return;
    check_whole("cold", a, N_BATCHES);
    check_work(&c, a, (work_t){N_TRAIN, 0, N_BLOCKS, 0});
    /* The student is compared with the teacher. */
    double agree =
        json_number_value(json_object_get(json_object_get(a, "teacher"), "test_agreement"));
    CHECK(agree > 0.5 && agree <= 1.0);
    CHECK(json_is_number(json_object_get(json_object_get(a, "teacher"), "val_kl")));
    accuracy_a = accuracy(a);
    student_path(&c, student_a, sizeof student_a);
    size_t n;
    kd_cache_entry_info_t *list = list_entries(cache_dir, &n);
    CHECK(n == 1);
    if (n == 1) {
        snprintf(entry_a, sizeof entry_a, "%s", list[0].name);
        CHECK(list[0].ok && list[0].blocks == N_BLOCKS && list[0].blocks_written == N_BLOCKS);
        CHECK(list[0].key.n_samples == N_TRAIN);
    }
    free(list);
    CHECK(cache_ls_count(cache_dir) == 1);
    json_decref(a);

    /* The same run again: no forward pass, the same student bit for bit. */
    json_t *b = run(&c, "warm", NULL);
    if (b) {
        check_whole("warm", b, N_BATCHES);
        check_work(&c, b, (work_t){0, N_BLOCKS, 0, 0});
        CHECK(accuracy(b) == accuracy_a);
        char path[KD_PATH_MAX + 128];
        student_path(&c, path, sizeof path);
        CHECK(kd_test_same_file(path, student_a));
    }
    json_decref(b);

    /* A sweep over T and alpha: the raw logits serve it as they are. */
    const char *sweep[] = {"distill.temperature=2", "distill.alpha=0.5", NULL};
    json_t *s = run(&c, "sweep", sweep);
    if (s) {
        check_whole("sweep", s, N_BATCHES);
        check_work(&c, s, (work_t){0, N_BLOCKS, 0, 0});
        char path[KD_PATH_MAX + 128];
        student_path(&c, path, sizeof path);
        CHECK(!kd_test_same_file(path, student_a)); /* it did train differently */
    }
    json_decref(s);
    CHECK(cache_ls_count(cache_dir) == 1);

    /* One float of the teacher nudged: another teacher, another entry, computed anew. */
    char nudged[KD_PATH_MAX + 64], ckpt_arg[KD_PATH_MAX + 96];
    snprintf(nudged, sizeof nudged, "%s/teacher_nudged.safetensors", tmp);
    nudge_teacher(nudged);
    snprintf(ckpt_arg, sizeof ckpt_arg, "teacher.checkpoint=%s", nudged);
    const char *nudge[] = {ckpt_arg, NULL};
    json_t *t = run(&c, "nudged", nudge);
    if (t) {
        check_whole("nudged", t, N_BATCHES);
        check_work(&c, t, (work_t){N_TRAIN, 0, N_BLOCKS, 0});
    }
    json_decref(t);
    CHECK(cache_ls_count(cache_dir) == 2);

    /* Another training split: another data fingerprint, another entry. */
    char subset_arg[64];
    snprintf(subset_arg, sizeof subset_arg, "data.train_subset=%d", SUBSET_2);
    const char *other[] = {subset_arg, NULL};
    json_t *o = run(&c, "other_data", other);
    if (o) {
        check_whole("other_data", o, (N_TRAIN_2 + 127) / 128);
        check_work(&c, o, (work_t){N_TRAIN_2, 0, (N_TRAIN_2 + BLOCK_ROWS - 1) / BLOCK_ROWS, 0});
    }
    json_decref(o);
    CHECK(cache_ls_count(cache_dir) == 3);
    list = list_entries(cache_dir, &n);
    int same_teacher = 0;
    for (size_t i = 0; i < n; i++) /* the other split is keyed by the same teacher */
        same_teacher += strncmp(list[i].name, entry_a, KD_CACHE_FP_HEX) == 0;
    CHECK(same_teacher == 2);
    free(list);
}

/* ---- 2. a corrupt block is found, reported, recomputed --------------------------------------- */

static void test_corrupt_block(void) {
    if (!entry_a[0]) return;
    char data[KD_PATH_MAX + 256], block_arg[64];
    snprintf(data, sizeof data, "%s/%s/logits.bin", cache_dir, entry_a);
    /* Layout (kd_cache.c): 64-byte file header, then per block a 32-byte header and
     * BLOCK_ROWS fp32 records of N_CLASSES floats. A byte in the middle of block 7's records: */
    const off_t stride = 32 + (off_t)BLOCK_ROWS * N_CLASSES * 4;
    const off_t at = 64 + CORRUPT_BLOCK * stride + 32 + 1000;
    int fd = open(data, O_RDWR);
    CHECK(fd >= 0);
    if (fd < 0) return;
    uint8_t byte = 0;
    CHECK(pread(fd, &byte, 1, at) == 1);
    byte ^= 0x10;
    CHECK(pwrite(fd, &byte, 1, at) == 1);
    close(fd);

    CHECK(kdist_cmd("cache", "verify", "--dir", cache_dir, NULL) == 1);
    snprintf(block_arg, sizeof block_arg, "block %d", CORRUPT_BLOCK);
    CHECK_ERR_HAS(out_buf, entry_a);
    CHECK_ERR_HAS(out_buf, "CORRUPT");
    CHECK_ERR_HAS(out_buf, block_arg);
    CHECK_ERR_HAS(out_buf, "1 corrupt");
    fprintf(stderr, "verify after the flip said:\n%s", out_buf);

    /* The next run finds it, recomputes that block alone, and trains the same student. */
    cluster_t c;
    json_t *s = run(&c, "recompute", NULL);
    if (s) {
        check_whole("recompute", s, N_BATCHES);
        /* exactly that block: found corrupt, computed again (its 256 samples) */
        check_work(&c, s, (work_t){BLOCK_ROWS, N_BLOCKS - 1, 0, 1});
        char path[KD_PATH_MAX + 128];
        student_path(&c, path, sizeof path);
        CHECK(kd_test_same_file(path, student_a));
    }
    json_decref(s);
    int rc = kdist_cmd("cache", "verify", "--dir", cache_dir, entry_a, NULL);
    CHECK(rc == 0);
    char want[64];
    snprintf(want, sizeof want, "%d blocks: %d ok, 0 missing, 0 corrupt", N_BLOCKS, N_BLOCKS);
    CHECK_ERR_HAS(out_buf, want);
    if (rc != 0) fprintf(stderr, "verify after the recompute said:\n%s", out_buf);
    CHECK(kdist_cmd("cache", "verify", "--dir", cache_dir, NULL) == 0);
}

/* ---- 3. export = the teacher's logits on the training split ---------------------------------- */

static char eval_npy[KD_PATH_MAX + 32];

static void test_export_matches_eval(void) {
    if (!entry_a[0]) return;
    char export_npy[KD_PATH_MAX + 32], err[KD_ERR_LEN];
    snprintf(export_npy, sizeof export_npy, "%s/export.npy", tmp);
    snprintf(eval_npy, sizeof eval_npy, "%s/eval_train.npy", tmp);
    int rc = kdist_cmd("cache", "export", "--dir", cache_dir, entry_a, "--out", export_npy, NULL);
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "export said:\n%s", out_buf);
    rc = kdist_cmd("eval", teacher_ckpt, "--recipe", recipe, "--model", "teacher", "--split",
                   "train", "--dump-logits", eval_npy, NULL);
    CHECK(rc == 0);
    fprintf(stderr, "eval said: %s", out_buf);
    char want[64];
    snprintf(want, sizeof want, "train (%d samples)", N_TRAIN);
    CHECK_ERR_HAS(out_buf, want);

    float *x = NULL, *y = NULL;
    size_t xr = 0, xc = 0, yr = 0, yc = 0;
    CHECK(kd_npy_read_f32(export_npy, &x, &xr, &xc, err, sizeof err) == 0);
    CHECK(kd_npy_read_f32(eval_npy, &y, &yr, &yc, err, sizeof err) == 0);
    CHECK(xr == N_TRAIN && xc == N_CLASSES);
    CHECK(yr == xr && yc == xc);
    if (x && y && xr == yr && xc == yc) {
        double worst = 0;
        size_t exact_rows = 0, worst_at = 0;
        for (size_t i = 0; i < xr; i++) {
            bool exact = true;
            for (size_t j = 0; j < xc; j++) {
                double a = x[i * xc + j], b = y[i * xc + j];
                double rel = fabs(a - b) / fmax(1.0, fmax(fabs(a), fabs(b)));
                if (rel > worst) worst = rel, worst_at = i;
                exact = exact && a == b;
            }
            exact_rows += exact;
        }
        fprintf(stderr,
                "export vs eval --split train: %zu x %zu, max relative difference %.3g (row %zu), "
                "%zu rows bit-identical\n",
                xr, xc, worst, worst_at, exact_rows);
        CHECK(worst <= 1e-5);
    }
    free(x);
    free(y);
}

/* ---- 4. distilling from imported logits, with no teacher weights ----------------------------- */

/* The data fingerprint a user is told: a run that asks for an import that is not there names
 * the split's fingerprint and the import command in the teacher node's log. */
static bool fingerprint_from_failed_run(char fp[KD_CACHE_FP_HEX + 1]) {
    cluster_t c;
    const char *missing[] = {"cache.import=td_import", NULL};
    if (!cluster_start(&c, "import_missing", 1, 0, missing)) return false;
    int rc = kd_test_wait(c.teachers[0], 60);
    CHECK(rc != 0 && rc != -1); /* the teacher node gives up with the message */
    kill(c.coord, SIGTERM);
    kd_test_wait(c.coord, 30);
    char text[1 << 16];
    CHECK(kd_test_read_text(c.teacher_log[0], text, sizeof text));
    const char *p = strstr(text, "data fingerprint ");
    CHECK(p != NULL);
    CHECK_ERR_HAS(text, "kdist cache import");
    if (!p) {
        kd_test_show_log(c.teacher_log[0]);
        return false;
    }
    p += strlen("data fingerprint ");
    size_t n = 0;
    while (n < KD_CACHE_FP_HEX && ((p[n] >= '0' && p[n] <= '9') || (p[n] >= 'a' && p[n] <= 'f')))
        n++;
    CHECK(n == KD_CACHE_FP_HEX);
    memcpy(fp, p, n);
    fp[n] = 0;
    return n == KD_CACHE_FP_HEX;
}

static void test_import(void) {
    if (!eval_npy[0] || accuracy_a < 0) return;
    char fp[KD_CACHE_FP_HEX + 1] = "";
    if (!fingerprint_from_failed_run(fp)) return;
    /* The same fingerprint as the split's entry (its second half) and as the library computes. */
    CHECK(strncmp(entry_a + KD_CACHE_FP_HEX + 1, fp, KD_CACHE_FP_HEX) == 0);
    kd_recipe_t r;
    kd_splits_t d = {0};
    char err[KD_ERR_LEN], lib_fp[KD_CACHE_FP_HEX + 1] = "";
    CHECK(kd_recipe_load(recipe, NULL, 0, &r, err, sizeof err) == 0);
    CHECK(kd_splits_load(&r, &d, err, sizeof err) == 0);
    if (d.train) kd_cache_fingerprint_data(d.train, "pixels u8/255", lib_fp);
    CHECK(strcmp(lib_fp, fp) == 0);
    kd_splits_destroy(&d);
    fprintf(stderr, "data fingerprint from the failed run: %s\n", fp);

    /* The eval dump stands for logits computed elsewhere. */
    int rc = kdist_cmd("cache", "import", "--dir", cache_dir, "--data-fingerprint", fp, "--label",
                       "td_import", "--encoding", "fp32", eval_npy, NULL);
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "import said:\n%s", out_buf);
    CHECK(cache_ls_count(cache_dir) == 4);

    char nowhere[KD_PATH_MAX + 96];
    snprintf(nowhere, sizeof nowhere, "teacher.checkpoint=%s/nowhere/teacher.safetensors", tmp);
    const char *import[] = {"cache.import=td_import", nowhere, NULL};
    cluster_t c;
    json_t *s = run(&c, "imported", import);
    if (!s) return;
    check_whole("imported", s, N_BATCHES);
    check_work(&c, s, (work_t){0, N_BLOCKS, 0, 0});
    fprintf(stderr, "imported logits: test accuracy %.4f, from the teacher %.4f\n", accuracy(s),
            accuracy_a);
    CHECK(fabs(accuracy(s) - accuracy_a) <= IMPORT_ACCURACY_TOL);
    json_decref(s);
}

/* ---- 5. two teacher nodes fill one cold cache; one is killed mid-fill ------------------------ */

/* Which blocks of the entry's data file carry the written marker (format in kd_cache.c).
 * Returns the number written, -1 when the entry is not there yet. */
static long written_blocks(const char *data, size_t n_blocks, size_t half, long *low, long *high) {
    int fd = open(data, O_RDONLY);
    if (fd < 0) return -1;
    const off_t stride = 32 + (off_t)BLOCK_ROWS * N_CLASSES * 4;
    long n = 0;
    *low = *high = 0;
    for (size_t b = 0; b < n_blocks; b++) {
        uint8_t m[4] = {0};
        if (pread(fd, m, 4, 64 + (off_t)b * stride) == 4 && memcmp(m, "KDCB", 4) == 0) {
            n++;
            ++*(b < half ? low : high);
        }
    }
    close(fd);
    return n;
}

/* The teacher's logits of every sample of train as a teacher node computes them: blocks of
 * BLOCK_ROWS consecutive ids, each one forward pass of exactly S rows (zero-padded). */
static float *reference_logits(const kd_recipe_t *r, const kd_dataset_t *train, size_t S) {
    char err[KD_ERR_LEN];
    kd_model_t *m = NULL;
    if (kd_model_from_recipe(r, true, train, &m, err, sizeof err) != 0 ||
        kd_checkpoint_load(m, teacher_ckpt, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        kd_model_destroy(&m);
        return NULL;
    }
    const size_t D = train->sample_dim, C = (size_t)m->num_classes;
    float *x = kd_alloc_floats(S * D), *out = kd_alloc_floats(train->n * C);
    for (size_t first = 0; first < train->n; first += S) {
        size_t rows = train->n - first < S ? train->n - first : S;
        memset(x, 0, S * D * sizeof *x);
        kd_pixels_to_float(train->pixels + first * D, rows * D, x);
        const float *y = kd_model_forward(m, x, (int)S, false, 0);
        memcpy(out + first * C, y, rows * C * sizeof *out);
    }
    free(x);
    kd_model_destroy(&m);
    return out;
}

/* Batches of epoch 0 teacher node t was assigned (its TEACHER-ASSIGN line), -1 before any. */
static long assigned_batches(const cluster_t *c, int t) {
    static char text[1 << 18];
    if (!kd_test_read_text(c->teacher_log[t], text, sizeof text)) return -1;
    const char *p = strstr(text, "TEACHER-ASSIGN epoch 0: ");
    return p ? strtol(p + strlen("TEACHER-ASSIGN epoch 0: "), NULL, 10) : -1;
}

static void test_teacher_killed_mid_fill(void) {
    char dir5[KD_PATH_MAX + 32], dir_arg[KD_PATH_MAX + 48], err[KD_ERR_LEN];
    snprintf(dir5, sizeof dir5, "%s/cache_shared", tmp);
    snprintf(dir_arg, sizeof dir_arg, "cache.dir=%s", dir5);
    /* The whole training file, so the fill lasts long enough to strike in the middle; a death
     * is noticed in 1.5 s. */
    const char *o[] = {dir_arg,
                       "data.train_subset=0",
                       "cluster.teachers=2",
                       "cluster.workers=2",
                       "cluster.heartbeat_ms=100",
                       "cluster.heartbeat_timeout_ms=1500",
                       NULL};
    kd_recipe_t r;
    kd_splits_t d = {0};
    CHECK(kd_recipe_load(recipe, o, 6, &r, err, sizeof err) == 0);
    CHECK(kd_splits_load(&r, &d, err, sizeof err) == 0);
    if (!d.train) return;
    const size_t N = d.train->n, n_blocks = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
    const long n_batches = (long)((N + 127) / 128);
    char tfp[KD_CACHE_FP_HEX + 1], dfp[KD_CACHE_FP_HEX + 1], data[KD_PATH_MAX + 200];
    {
        kd_model_t *m = NULL;
        CHECK(kd_model_from_recipe(&r, true, d.train, &m, err, sizeof err) == 0 &&
              kd_checkpoint_load(m, teacher_ckpt, err, sizeof err) == 0);
        kd_cache_fingerprint_teacher(m, tfp);
        kd_model_destroy(&m);
    }
    kd_cache_fingerprint_data(d.train, "pixels u8/255", dfp);
    snprintf(data, sizeof data, "%s/%s-%s/fp32/logits.bin", dir5, tfp, dfp);

    cluster_t c;
    double t0 = kd_test_now();
    if (!cluster_start(&c, "two_teachers", 2, 2, o)) {
        kd_splits_destroy(&d);
        return;
    }
    /* Strike while both nodes are writing, well into it (node 0 fills from block 0, node 1 from
     * the middle, so each half of the file shows one node's progress), at the node that holds
     * the epoch's batches (the coordinator waits briefly for cluster.teachers nodes before it
     * assigns the first epoch; should one be late, the other holds them all). */
    const long enough = (long)n_blocks / 8;
    long written = -1, low = 0, high = 0, share[2] = {-1, -1};
    double deadline = kd_test_now() + 90;
    while (kd_test_now() < deadline) {
        written = written_blocks(data, n_blocks, n_blocks / 2, &low, &high);
        share[0] = assigned_batches(&c, 0);
        share[1] = assigned_batches(&c, 1);
        if (written >= 0 && low >= enough && high >= enough && share[0] + share[1] > 0) break;
        nanosleep(&(struct timespec){0, 1000 * 1000}, NULL);
    }
    bool mid_fill = low >= enough && high >= enough && written < (long)n_blocks;
    CHECK(mid_fill);
    const int victim = share[1] > share[0] ? 1 : 0, survivor = 1 - victim;
    CHECK(share[victim] > 0);
    kill(c.teachers[victim], SIGKILL);
    int killed_rc = kd_test_wait(c.teachers[victim], 10);
    c.teachers[victim] = 0;
    CHECK(killed_rc == 128 + SIGKILL);
    fprintf(stderr,
            "teacher %d (%ld batches assigned; teacher %d: %ld) killed %.2f s into the run with "
            "%ld/%zu blocks written (%ld + %ld)\n",
            victim, share[victim], survivor, share[survivor], kd_test_now() - t0, written, n_blocks,
            low, high);

    json_t *s = cluster_finish(&c);
    fprintf(stderr, "two_teachers: %.1f s\n", kd_test_now() - t0);
    if (s) {
        check_whole("two_teachers", s, n_batches);
        /* The survivor had every block, from the cache (what the victim wrote before it died)
         * or from its own forward passes; the summary adds what the victim reported. */
        work_t node = {-1, -1, -1, -1}, sum = summary_work(s);
        CHECK(node_work(&c, survivor, &node));
        fprintf(stderr,
                "two_teachers: teacher node %d: %ld forward samples, %ld hits, %ld misses, %ld "
                "corrupt; summary.json (both nodes): %ld, %ld, %ld, %ld; test accuracy %.4f\n",
                survivor, node.forward, node.hits, node.misses, node.corrupt, sum.forward, sum.hits,
                sum.misses, sum.corrupt, accuracy(s));
        CHECK(node.hits + node.misses + node.corrupt == (long)n_blocks);
        /* How many blocks the survivor took from the victim depends on where each node's fill
         * was when the other reached it: on a loaded machine one node can finish its half before
         * the other computes much, and then both compute the same blocks at the same moment
         * (seen once in CI: 0 taken). Reuse is reported, not asserted; the cache's consistency
         * is (verify and export below). */
        CHECK(node.forward > 0 && node.forward <= (long)N);
        CHECK(sum.forward >= node.forward);
        CHECK(sum.hits + sum.misses + sum.corrupt >= (long)n_blocks);
        /* The victim's batches went to the survivor. */
        char text[1 << 16], gone[64];
        snprintf(gone, sizeof gone, "teacher %d is gone", victim);
        bool reassigned =
            kd_test_read_text(c.coord_log, text, sizeof text) && strstr(text, gone) != NULL;
        CHECK(reassigned);
        if (!reassigned) kd_test_show_log(c.coord_log);
    }
    json_decref(s);

    int rc = kdist_cmd("cache", "verify", "--dir", dir5, NULL);
    CHECK(rc == 0);
    char want[96];
    snprintf(want, sizeof want, "%zu blocks: %zu ok, 0 missing, 0 corrupt", n_blocks, n_blocks);
    CHECK_ERR_HAS(out_buf, want);
    if (rc != 0) fprintf(stderr, "verify said:\n%s", out_buf);

    /* What the two wrote is the teacher's logits, row for row. */
    char npy[KD_PATH_MAX + 32];
    snprintf(npy, sizeof npy, "%s/shared.npy", tmp);
    CHECK(kdist_cmd("cache", "export", "--dir", dir5, tfp, "--out", npy, NULL) == 0);
    float *got = NULL, *want_logits = reference_logits(&r, d.train, (size_t)r.teacher.batch_size);
    size_t rows = 0, cols = 0;
    CHECK(kd_npy_read_f32(npy, &got, &rows, &cols, err, sizeof err) == 0);
    CHECK(rows == N && cols == N_CLASSES);
    if (got && want_logits && rows == N && cols == N_CLASSES) {
        size_t differ = 0;
        for (size_t i = 0; i < N * N_CLASSES; i++) differ += got[i] != want_logits[i];
        CHECK(differ == 0);
        if (differ) fprintf(stderr, "%zu cached logits differ from the teacher's\n", differ);
    }
    free(got);
    free(want_logits);
    kd_splits_destroy(&d);
}

int main(void) {
    snprintf(tmp, sizeof tmp, "%s", kd_test_tmpdir("test_distill"));
    snprintf(teacher_ckpt, sizeof teacher_ckpt, "%s/teacher.safetensors", tmp);
    snprintf(cache_dir, sizeof cache_dir, "%s/cache", tmp);
    snprintf(recipe, sizeof recipe, "%s/distill.yaml", tmp);
    char text[8192];
    snprintf(text, sizeof text,
             "%s  checkpoint: \"%s\"\ncache: {dir: \"%s\"}\nlogging: {runs_dir: \"%s/runs\"}\n",
             distill_text, teacher_ckpt, cache_dir, tmp);
    kd_test_write_text(recipe, text);
    double t0 = kd_test_now();
    double teacher_accuracy = train_teacher();
    CHECK(teacher_accuracy > 0.6);

    test_computed_once();
    test_corrupt_block();
    test_export_matches_eval();
    test_import();
    test_teacher_killed_mid_fill();
    fprintf(stderr, "test_distill: %.1f s in all\n", kd_test_now() - t0);
    return kd_test_done("test_distill");
}
