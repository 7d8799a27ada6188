/* test_recipe: the recipe loader — every value of a full recipe, defaults, overrides, the
 * to_yaml round trip, every error with its file:line:col, caret and did-you-mean, and random
 * or truncated input (an error, never a crash). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_recipe.h"
#include "kd_test.h"

static const char *full_recipe =
    "# a complete recipe: every key given, none at its default\n"
    "name: fashion_mlp_student\n"
    "seed: 42\n"
    "data:\n"
    "  dir: /data/fm\n"
    "  train_images: a.gz\n"
    "  train_labels: b.gz\n"
    "  test_images: c.gz\n"
    "  test_labels: /abs/d.gz\n"
    "  val_size: 1234\n"
    "  train_subset: 20000\n"
    "  test_subset: 300\n"
    "student:\n"
    "  layers:\n"
    "    - {type: flatten}\n"
    "    - {type: linear, out_features: 800}\n"
    "    - type: relu\n"
    "    - {type: conv2d, out_channels: 32, kernel: 3, stride: 2, padding: 1}\n"
    "    - {type: maxpool2d, kernel: 2}\n"
    "    - {type: maxpool2d, kernel: 3, stride: 1}\n"
    "    - {type: gelu}\n"
    "    - {type: dropout, p: 0.3}\n"
    "teacher:\n"
    "  checkpoint: \"teacher #1.safetensors\"\n"
    "  layers: [{type: flatten}, {type: linear, out_features: 10}]\n"
    "  batch_size: 512\n"
    "distill:\n"
    "  loss: symmetric_kl\n"
    "  temperature: 2.5\n"
    "  alpha: .5\n"
    "optim:\n"
    "  name: adamw\n"
    "  lr: 3e-3\n"
    "  momentum: 0.8\n"
    "  nesterov: false\n"
    "  weight_decay: 5e-4\n"
    "  beta1: 0.85\n"
    "  beta2: 0.99\n"
    "  eps: 1e-7\n"
    "  clip_norm: 1.5\n"
    "schedule:\n"
    "  name: cosine\n"
    "  warmup_steps: 100\n"
    "  step_size: 50\n"
    "  gamma: 0.5\n"
    "  min_lr: 1e-5\n"
    "  pct_start: 0.25\n"
    "  div_factor: 10\n"
    "  final_div_factor: 1e3\n"
    "train:\n"
    "  epochs: 3\n"
    "  batch_size: 64\n"
    "  max_steps: 1e4\n"
    "  threads: 2\n"
    "eval:\n"
    "  every_steps: 500\n"
    "  batch_size: 2000\n"
    "  patience: 4\n"
    "checkpoint:\n"
    "  every_steps: 250\n"
    "  keep: 5\n"
    "cluster:\n"
    "  workers: 8\n"
    "  teachers: 2\n"
    "  consistency: ssp\n"
    "  staleness: 3\n"
    "  heartbeat_ms: 500\n"
    "  heartbeat_timeout_ms: 4000\n"
    "logging:\n"
    "  runs_dir: out/runs\n"
    "  level: debug\n";

/* Smallest valid recipe. */
#define MINIMAL "name: t\nstudent:\n  layers: [{type: flatten}, {type: linear, out_features: 10}]\n"

static char err[2048];

static int parse(const char *text, kd_recipe_t *r) {
    err[0] = 0;
    return kd_recipe_parse("t.yaml", text, strlen(text), NULL, 0, r, err, sizeof err);
}

static int parse_ov(const char *text, const char *const *ov, int n, kd_recipe_t *r) {
    err[0] = 0;
    return kd_recipe_parse("t.yaml", text, strlen(text), ov, n, r, err, sizeof err);
}

/* The message starts "t.yaml:LINE:COL: ", the third line holds a caret under column COL. */
static void check_loc(int line, int col) {
    char want[64];
    snprintf(want, sizeof want, "t.yaml:%d:%d: ", line, col);
    kd_test_checks++;
    if (strncmp(err, want, strlen(want)) != 0) {
        kd_test_failures++;
        fprintf(stderr, "error \"%s\" does not start with \"%s\"\n", err, want);
        return;
    }
    const char *l2 = strchr(err, '\n');
    const char *l3 = l2 ? strchr(l2 + 1, '\n') : NULL;
    int spaces = 0;
    if (l3)
        for (l3++; *l3 == ' ' || *l3 == '\t'; l3++) spaces++;
    CHECK(l3 && *l3 == '^' && spaces == col - 1);
}

/* text must fail with a message located at line:col that contains every needle. */
static void expect_err(const char *text, int line, int col, const char *n1, const char *n2) {
    kd_recipe_t r;
    CHECK(parse(text, &r) == -1);
    check_loc(line, col);
    if (n1) CHECK_ERR_HAS(err, n1);
    if (n2) CHECK_ERR_HAS(err, n2);
}

static void check_full(const kd_recipe_t *r) {
    CHECK(strcmp(r->name, "fashion_mlp_student") == 0);
    CHECK(r->seed == 42);
    CHECK(strcmp(r->data.dir, "/data/fm") == 0);
    CHECK(strcmp(r->data.train_images, "a.gz") == 0);
    CHECK(strcmp(r->data.train_labels, "b.gz") == 0);
    CHECK(strcmp(r->data.test_images, "c.gz") == 0);
    CHECK(strcmp(r->data.test_labels, "/abs/d.gz") == 0);
    CHECK(r->data.val_size == 1234 && r->data.train_subset == 20000 && r->data.test_subset == 300);

    CHECK(r->student.n_layers == 8);
    const kd_layer_spec_t *L = r->student.layers;
    CHECK(L[0].kind == KD_LAYER_FLATTEN);
    CHECK(L[1].kind == KD_LAYER_LINEAR && L[1].out_features == 800);
    CHECK(L[2].kind == KD_LAYER_RELU);
    CHECK(L[3].kind == KD_LAYER_CONV2D && L[3].out_channels == 32 && L[3].kernel == 3 &&
          L[3].stride == 2 && L[3].padding == 1);
    CHECK(L[4].kind == KD_LAYER_MAXPOOL2D && L[4].kernel == 2 && L[4].stride == 2);
    CHECK(L[5].kind == KD_LAYER_MAXPOOL2D && L[5].kernel == 3 && L[5].stride == 1);
    CHECK(L[6].kind == KD_LAYER_GELU);
    CHECK(L[7].kind == KD_LAYER_DROPOUT && L[7].p == 0.3f);
    CHECK(L[1].kernel == 0 && L[1].p == 0.0f); /* unused fields stay 0 */

    CHECK(strcmp(r->teacher.checkpoint, "teacher #1.safetensors") == 0);
    CHECK(r->teacher.n_layers == 2 && r->teacher.layers[1].kind == KD_LAYER_LINEAR &&
          r->teacher.layers[1].out_features == 10);
    CHECK(r->teacher.batch_size == 512);

    CHECK(r->distill.loss.divergence == KD_DIV_SYMMETRIC_KL);
    CHECK(r->distill.loss.temperature == 2.5f);
    CHECK(r->distill.loss.alpha == 0.5f);

    CHECK(r->optim.cfg.kind == KD_OPT_ADAMW);
    CHECK(r->schedule.cfg.lr == 3e-3f);
    CHECK(r->optim.cfg.momentum == 0.8f);
    CHECK(r->optim.cfg.nesterov == false);
    CHECK(r->optim.cfg.weight_decay == 5e-4f);
    CHECK(r->optim.cfg.beta1 == 0.85f && r->optim.cfg.beta2 == 0.99f);
    CHECK(r->optim.cfg.eps == 1e-7f);
    CHECK(r->optim.cfg.clip_norm == 1.5f);

    CHECK(r->schedule.cfg.kind == KD_SCHED_COSINE);
    CHECK(r->schedule.cfg.warmup_steps == 100 && r->schedule.cfg.step_size == 50);
    CHECK(r->schedule.cfg.gamma == 0.5f && r->schedule.cfg.min_lr == 1e-5f);
    CHECK(r->schedule.cfg.pct_start == 0.25f && r->schedule.cfg.div_factor == 10.0f);
    CHECK(r->schedule.cfg.final_div_factor == 1e3f);
    CHECK(r->schedule.cfg.total_steps == 0); /* derived by the trainer, not a key */

    CHECK(r->train.epochs == 3 && r->train.batch_size == 64 && r->train.max_steps == 10000 &&
          r->train.threads == 2);
    CHECK(r->eval.every_steps == 500 && r->eval.batch_size == 2000 && r->eval.patience == 4);
    CHECK(r->checkpoint.every_steps == 250 && r->checkpoint.keep == 5);
    CHECK(r->cluster.workers == 8 && r->cluster.teachers == 2);
    CHECK(r->cluster.consistency == KD_CONSISTENCY_SSP);
    CHECK(r->cluster.staleness == 3 && r->cluster.heartbeat_ms == 500 &&
          r->cluster.heartbeat_timeout_ms == 4000);
    CHECK(strcmp(r->logging.runs_dir, "out/runs") == 0);
    CHECK(strcmp(r->logging.level, "debug") == 0);
}

static void test_full(void) {
    kd_recipe_t r;
    CHECK(parse(full_recipe, &r) == 0);
    if (err[0]) fprintf(stderr, "%s\n", err);
    check_full(&r);
}

static void test_defaults(void) {
    kd_recipe_t r, d;
    CHECK(parse(MINIMAL, &r) == 0);
    kd_recipe_defaults(&d);
    CHECK(d.student.n_layers == 0 && d.teacher.n_layers == 0 && d.name[0] == 0);
    CHECK(strcmp(r.name, "t") == 0);
    CHECK(r.seed == 1);
    CHECK(strcmp(r.data.dir, "/usr/share/datasets/fashion-mnist") == 0);
    CHECK(strcmp(r.data.train_images, "train-images-idx3-ubyte.gz") == 0);
    CHECK(strcmp(r.data.train_labels, "train-labels-idx1-ubyte.gz") == 0);
    CHECK(strcmp(r.data.test_images, "t10k-images-idx3-ubyte.gz") == 0);
    CHECK(strcmp(r.data.test_labels, "t10k-labels-idx1-ubyte.gz") == 0);
    CHECK(r.data.val_size == 5000 && r.data.train_subset == 0 && r.data.test_subset == 0);
    CHECK(r.student.n_layers == 2 && r.student.layers[1].out_features == 10);
    CHECK(r.teacher.checkpoint[0] == 0 && r.teacher.n_layers == 0 && r.teacher.batch_size == 256);
    CHECK(r.distill.loss.divergence == KD_DIV_FORWARD_KL);
    CHECK(r.distill.loss.temperature == 4.0f && r.distill.loss.alpha == 0.0f);
    CHECK(r.optim.cfg.kind == KD_OPT_SGD && r.schedule.cfg.lr == 0.05f);
    CHECK(r.optim.cfg.momentum == 0.9f && r.optim.cfg.nesterov == true);
    CHECK(r.optim.cfg.weight_decay == 5e-4f && r.optim.cfg.beta1 == 0.9f);
    CHECK(r.optim.cfg.beta2 == 0.999f && r.optim.cfg.eps == 1e-8f && r.optim.cfg.clip_norm == 0);
    CHECK(r.schedule.cfg.kind == KD_SCHED_ONECYCLE && r.schedule.cfg.warmup_steps == 0);
    CHECK(r.schedule.cfg.step_size == 1000 && r.schedule.cfg.gamma == 0.1f);
    CHECK(r.schedule.cfg.min_lr == 0 && r.schedule.cfg.pct_start == 0.3f);
    CHECK(r.schedule.cfg.div_factor == 25.0f && r.schedule.cfg.final_div_factor == 1e4f);
    CHECK(r.train.epochs == 15 && r.train.batch_size == 128 && r.train.max_steps == 0 &&
          r.train.threads == 0);
    CHECK(r.eval.every_steps == 0 && r.eval.batch_size == 1000 && r.eval.patience == 0);
    CHECK(r.checkpoint.every_steps == 0 && r.checkpoint.keep == 3);
    CHECK(r.cluster.workers == 2 && r.cluster.teachers == 1);
    CHECK(r.cluster.consistency == KD_CONSISTENCY_SYNC && r.cluster.staleness == 2);
    CHECK(r.cluster.heartbeat_ms == 1000 && r.cluster.heartbeat_timeout_ms == 10000);
    CHECK(strcmp(r.logging.runs_dir, "runs") == 0 && strcmp(r.logging.level, "info") == 0);
    /* conv2d defaults */
    CHECK(parse("name: t\nstudent: {layers: [{type: conv2d, out_channels: 4, kernel: 5}]}\n", &r) ==
          0);
    CHECK(r.student.layers[0].stride == 1 && r.student.layers[0].padding == 0);
    /* an empty section and a null-free minimal layout are fine */
    CHECK(parse(MINIMAL "eval: {}\n", &r) == 0);
}

static void round_trip(const kd_recipe_t *a) {
    char *y = kd_recipe_to_yaml(a);
    kd_recipe_t b;
    CHECK(parse(y, &b) == 0);
    if (err[0]) fprintf(stderr, "%s\n---\n%s\n", err, y);
    CHECK(memcmp(a, &b, sizeof b) == 0);
    /* writing again gives the same text */
    char *y2 = kd_recipe_to_yaml(&b);
    CHECK(strcmp(y, y2) == 0);
    free(y);
    free(y2);
}

static void test_round_trip(void) {
    kd_recipe_t r;
    CHECK(parse(full_recipe, &r) == 0);
    round_trip(&r);
    CHECK(parse(MINIMAL, &r) == 0);
    round_trip(&r);
    /* awkward strings and floats that need all 9 digits */
    const char *ov[] = {"teacher.checkpoint=a \"quoted\" \\ path: #x",
                        "data.dir=",
                        "optim.lr=0.1234567891",
                        "distill.temperature=3.3333333",
                        "logging.runs_dir=true",
                        "seed=9223372036854775807"};
    CHECK(parse_ov(full_recipe, ov, 6, &r) == 0);
    if (err[0]) fprintf(stderr, "%s\n", err);
    CHECK(strcmp(r.teacher.checkpoint, "a \"quoted\" \\ path: #x") == 0);
    CHECK(r.seed == 9223372036854775807L);
    round_trip(&r);
    char *y = kd_recipe_to_yaml(&r);
    CHECK(strstr(y, "    - {type: linear, out_features: 800}\n") != NULL);
    CHECK(strstr(y, "  lr: 0.12345679\n") != NULL);
    CHECK(strstr(y, "\nseed: 9223372036854775807\n") != NULL);
    free(y);
}

static void test_overrides(void) {
    kd_recipe_t r;
    const char *ok[] = {"optim.lr=0.2",
                        "train.batch_size=256",
                        "name=other-run.v2",
                        "seed=5",
                        "optim.nesterov=false",
                        "cluster.consistency=async",
                        "distill.loss=reverse_kl",
                        "logging.level=warn",
                        "data.dir=/x"};
    CHECK(parse_ov(full_recipe, ok, 9, &r) == 0);
    CHECK(r.schedule.cfg.lr == 0.2f && r.train.batch_size == 256);
    CHECK(strcmp(r.name, "other-run.v2") == 0 && r.seed == 5);
    CHECK(r.optim.cfg.nesterov == false && r.cluster.consistency == KD_CONSISTENCY_ASYNC);
    CHECK(r.distill.loss.divergence == KD_DIV_REVERSE_KL && strcmp(r.logging.level, "warn") == 0);
    CHECK(strcmp(r.data.dir, "/x") == 0);

    /* overrides supply a required key the file lacks */
    const char *nm[] = {"name=from_cli"};
    CHECK(parse_ov("student: {layers: [{type: relu}]}\n", nm, 1, &r) == 0);
    CHECK(strcmp(r.name, "from_cli") == 0);

    const char *bad_num[] = {"optim.lr=abc"};
    CHECK(parse_ov(full_recipe, bad_num, 1, &r) == -1);
    CHECK(strcmp(err, "override 'optim.lr=abc': expected a number, got 'abc'") == 0);

    const char *unknown[] = {"distill.temprature=3"};
    CHECK(parse_ov(full_recipe, unknown, 1, &r) == -1);
    CHECK_ERR_HAS(err, "override 'distill.temprature=3': unknown key 'distill.temprature'");
    CHECK_ERR_HAS(err, "(did you mean 'distill.temperature'?)");

    const char *range[] = {"train.batch_size=0"};
    CHECK(parse_ov(full_recipe, range, 1, &r) == -1);
    CHECK_ERR_HAS(err, "override 'train.batch_size=0': must be between 1 and 65536, got 0");

    const char *layers[] = {"student.layers=[]"};
    CHECK(parse_ov(full_recipe, layers, 1, &r) == -1);
    CHECK_ERR_HAS(err, "layer lists cannot be overridden");

    const char *noeq[] = {"optim.lr"};
    CHECK(parse_ov(full_recipe, noeq, 1, &r) == -1);
    CHECK_ERR_HAS(err, "override 'optim.lr': expected section.key=value");

    const char *badenum[] = {"cluster.consistency=asynk"};
    CHECK(parse_ov(full_recipe, badenum, 1, &r) == -1);
    CHECK_ERR_HAS(err, "expected one of: sync, async, ssp, got 'asynk' (did you mean 'async'?)");

    const char *badname[] = {"name=a/b"};
    CHECK(parse_ov(full_recipe, badname, 1, &r) == -1);
    CHECK_ERR_HAS(err, "override 'name=a/b': may contain only");

    /* kd_recipe_set: valid, and a failure leaves the recipe untouched */
    CHECK(parse(full_recipe, &r) == 0);
    kd_recipe_t before = r;
    CHECK(kd_recipe_set(&r, "train.epochs=0", err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "must be between 1 and 100000, got 0");
    CHECK(kd_recipe_set(&r, "train.batch_size=1.5", err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "expected a whole number, got '1.5'");
    CHECK(kd_recipe_set(&r, "eval.patience=-1", err, sizeof err) == -1);
    CHECK_ERR_HAS(err, "must be >= 0, got -1");
    CHECK(memcmp(&before, &r, sizeof r) == 0);
    CHECK(kd_recipe_set(&r, "train.epochs=7", err, sizeof err) == 0);
    CHECK(r.train.epochs == 7);
}

static void test_numbers(void) {
    kd_recipe_t r;
    CHECK(parse(MINIMAL "optim: {lr: .5, weight_decay: 5e-4, eps: 1E-6}\n"
                        "schedule: {final_div_factor: 1e4}\ntrain: {max_steps: 2e3}\n",
                &r) == 0);
    CHECK(r.schedule.cfg.lr == 0.5f && r.optim.cfg.weight_decay == 5e-4f &&
          r.optim.cfg.eps == 1e-6f);
    CHECK(r.schedule.cfg.final_div_factor == 1e4f && r.train.max_steps == 2000);
    expect_err(MINIMAL "train:\n  batch_size: 1.5\n", 5, 15, "train.batch_size",
               "expected a whole number, got '1.5'");
    expect_err(MINIMAL "optim: {lr: inf}\n", 4, 13, "expected a number, got 'inf'", NULL);
    expect_err(MINIMAL "optim: {lr: 0x10}\n", 4, 13, "expected a number, got '0x10'", NULL);
    expect_err(MINIMAL "optim: {lr: 1e999}\n", 4, 13, "expected a number", NULL);
    expect_err(MINIMAL "distill: {temperature: 0}\n", 4, 24, "must be > 0 and <= 100, got 0", NULL);
    expect_err(MINIMAL "distill: {alpha: 1.01}\n", 4, 18, "must be between 0 and 1, got 1.01",
               NULL);
    expect_err(MINIMAL "seed: 99999999999999999999\n", 4, 7, "seed", "too large");
}

static void test_errors(void) {
    /* YAML syntax: libyaml's problem and mark */
    expect_err("name: t\nstudent:\n\tlayers: []\n", 3, 1,
               "t.yaml:3:1: invalid YAML:", "found character that cannot start any token");
    expect_err(MINIMAL "optim: {lr: 0.1\n", 5, 1, "invalid YAML: did not find expected ',' or '}'",
               "flow mapping at line 4 column 8");
    expect_err("name: \"abc\n", 2, 1, "invalid YAML", "quoted scalar");
    expect_err(MINIMAL "seed: 1\n  x: \xff\n", 5, 6, "invalid YAML: invalid leading UTF-8 octet",
               "(byte 0xff)");
    /* unknown section / key, with and without a suggestion */
    expect_err(MINIMAL "distil:\n  alpha: 1\n", 4, 1, "unknown section 'distil'",
               "(did you mean 'distill'?)");
    expect_err(MINIMAL "distill:\n  alpha: 0.5\n  temprature: 3\n", 6, 3,
               "unknown key 'temprature' in 'distill' (did you mean 'temperature'?)", NULL);
    expect_err(MINIMAL "optim:\n  warmup: 3\n", 5, 3, "unknown key 'warmup' in 'optim'", NULL);
    CHECK(strstr(err, "did you mean") == NULL);
    expect_err(MINIMAL "train:\n  batch: 3\n", 5, 3, "(did you mean 'batch_size'?)", NULL);
    expect_err(MINIMAL "nmae: x\n", 4, 1, "unknown key 'nmae' (did you mean 'name'?)", NULL);
    expect_err(MINIMAL "zzzzzz: {a: 1}\n", 4, 1, "unknown section 'zzzzzz'", NULL);
    /* a key is a plain word, at the top level as in a section */
    expect_err(MINIMAL "train.epochs: 3\n", 4, 1,
               "unknown key 'train.epochs' (write it nested: train: {epochs: ...})", NULL);
    expect_err(MINIMAL "cluster:\n  security.curve: true\n", 5, 3,
               "unknown key 'security.curve' in 'cluster'", "security: {curve: ...}");
    /* wrong types */
    expect_err(MINIMAL "optim:\n  lr: abc\n", 5, 7, "optim.lr: expected a number, got 'abc'", NULL);
    expect_err(MINIMAL "optim:\n  nesterov: maybe\n", 5, 13,
               "optim.nesterov: expected true or false, got 'maybe'", NULL);
    expect_err(MINIMAL "cluster:\n  consistency: eventual\n", 5, 16,
               "cluster.consistency: expected one of: sync, async, ssp, got 'eventual'", NULL);
    expect_err(MINIMAL "distill: {loss: kl}\n", 4, 17, "expected one of: forward_kl", NULL);
    expect_err(MINIMAL "seed: {a: 1}\n", 4, 7, "seed: expected a whole number, got a mapping",
               NULL);
    expect_err(MINIMAL "logging: {level: [info]}\n", 4, 18, "logging.level: expected one of",
               "got a list");
    /* out of range */
    expect_err(MINIMAL "train:\n  batch_size: 0\n", 5, 15, "t.yaml:5:15: train.batch_size",
               "must be between 1 and 65536, got 0");
    expect_err(MINIMAL "optim: {momentum: 1}\n", 4, 19, "must be >= 0 and < 1, got 1", NULL);
    expect_err(MINIMAL "cluster: {workers: 2000}\n", 4, 20, "between 1 and 1024, got 2000", NULL);
    /* required keys */
    expect_err("student: {layers: [{type: relu}]}\n", 1, 1, "missing required key 'name'", NULL);
    expect_err("name: t\n", 1, 1, "missing required key 'student.layers'", NULL);
    expect_err("name: t\nstudent: {}\n", 2, 10, "missing required key 'student.layers'", NULL);
    expect_err("name: t\nstudent:\n  layers: []\n", 3, 11, "student.layers: must list at least",
               NULL);
    /* duplicates */
    expect_err(MINIMAL "name: u\n", 4, 1, "duplicate key 'name' (first given at line 1)", NULL);
    expect_err(MINIMAL "optim:\n  lr: 0.1\n  lr: 0.2\n", 6, 3, "duplicate key 'lr'", NULL);
    /* sections that are not mappings, and a non-mapping document */
    expect_err(MINIMAL "optim: 3\n", 4, 8,
               "section 'optim' must be a mapping of keys, got a scalar", NULL);
    expect_err(MINIMAL "data:\n  - a\n", 5, 3, "section 'data' must be a mapping", "got a list");
    expect_err("- a\n- b\n", 1, 1, "a recipe must be a mapping of sections, got a list", NULL);
    expect_err("", 1, 1, "the recipe is empty", NULL);
    expect_err("# only a comment\n", 1, 1, "the recipe is empty", NULL);
    expect_err(MINIMAL "? [a, b]\n: 1\n", 4, 3, "keys must be plain words", NULL);
    /* names, strings */
    expect_err("name: a/b\nstudent: {layers: [{type: relu}]}\n", 1, 7, "name: may contain only",
               NULL);
    expect_err("name: ..\nstudent: {layers: [{type: relu}]}\n", 1, 7, "cannot be a run directory",
               NULL);
    {
        char big[KD_PATH_MAX + 200];
        int n = snprintf(big, sizeof big, MINIMAL "data:\n  dir: ");
        memset(big + n, 'x', KD_PATH_MAX);
        strcpy(big + n + KD_PATH_MAX, "\n");
        expect_err(big, 5, 8, "data.dir: is too long", NULL);
    }
    expect_err(MINIMAL "data: {dir: \"a\\0b\"}\n", 4, 13, "contains a NUL byte", NULL);
    /* layer lists */
    expect_err("name: t\nstudent:\n  layers: 3\n", 3, 11,
               "student.layers: expected a list of layers", NULL);
    expect_err("name: t\nstudent:\n  layers:\n    - linear\n", 4, 7,
               "student.layers[0]: expected a mapping like {type: linear", "got a scalar 'linear'");
    expect_err("name: t\nstudent:\n  layers:\n    - {type: relu}\n    - {out_features: 3}\n", 5, 7,
               "student.layers[1]: missing 'type' (one of: flatten, linear, conv2d", NULL);
    expect_err("name: t\nstudent:\n  layers:\n    - {type: linaer, out_features: 3}\n", 4, 14,
               "student.layers[0]: unknown layer type 'linaer' (did you mean 'linear'?)", NULL);
    expect_err("name: t\nstudent:\n  layers:\n    - {type: transformer}\n", 4, 14,
               "unknown layer type 'transformer' (expected one of: flatten", NULL);
    expect_err("name: t\nstudent:\n  layers:\n    - {type: flatten}\n    - {type: linear}\n", 5, 7,
               "student.layers[1]: missing required key 'out_features' for a linear layer", NULL);
    expect_err("name: t\nstudent:\n  layers:\n    - {type: conv2d, kernel: 3}\n", 4, 7,
               "missing required key 'out_channels' for a conv2d layer", NULL);
    expect_err("name: t\nstudent:\n  layers:\n    - {type: linear, out_feature: 3}\n", 4, 22,
               "student.layers[0]: unknown key 'out_feature' for a linear layer",
               "(did you mean 'out_features'?)");
    expect_err("name: t\nstudent:\n  layers:\n    - {type: relu, inplace: true}\n", 4, 20,
               "unknown key 'inplace' for a relu layer (valid keys: 'type')", NULL);
    expect_err("name: t\nstudent:\n  layers:\n    - {type: dropout, p: 1}\n", 4, 26,
               "student.layers[0].p: must be >= 0 and < 1, got 1", NULL);
    expect_err("name: t\nstudent:\n  layers:\n    - {type: linear, out_features: 0}\n", 4, 36,
               "student.layers[0].out_features: must be between 1", NULL);
    expect_err("name: t\nstudent:\n  layers:\n    - {type: linear, type: relu}\n", 4, 22,
               "duplicate key 'type'", NULL);
    expect_err("name: t\nstudent:\n  layers:\n    - {type: [relu]}\n", 4, 14,
               "student.layers[0]: type: expected one of", NULL);
    expect_err("name: t\nstudent: {layers: [{type: relu}]}\nteacher:\n  layers: [{type: relu}, "
               "{type: gelu}, 7]\n",
               4, 40, "teacher.layers[2]: expected a mapping", NULL);
    {
        char many[8192];
        int n = snprintf(many, sizeof many, "name: t\nstudent:\n  layers:\n");
        for (int i = 0; i < KD_MAX_LAYERS + 1; i++)
            n += snprintf(many + n, sizeof many - (size_t)n, "    - {type: relu}\n");
        expect_err(many, 4, 5, "too many layers (65, at most 64)", NULL);
    }
    /* anchors / aliases, second document */
    expect_err(MINIMAL "eval: &e {batch_size: 10}\ncheckpoint: *e\n", 4, 7,
               "anchors and aliases are not supported", NULL);
    expect_err(MINIMAL "---\nname: again\n", 5, 1, "single YAML document", NULL);
    /* the caret follows characters, not bytes, on lines with UTF-8 */
    expect_err(MINIMAL "data: {dir: \"\xc3\xa9\xc3\xa9\", val_size: x}\n", 4, 29,
               "data.val_size: expected a whole number, got 'x'", NULL);
}

static void test_files(void) {
    const char *dir = kd_test_tmpdir("test_recipe");
    char path[1200];
    snprintf(path, sizeof path, "%s/fashion.yaml", dir);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    fputs(full_recipe, f);
    fclose(f);
    kd_recipe_t r;
    const char *ov[] = {"train.epochs=9"};
    CHECK(kd_recipe_load(path, ov, 1, &r, err, sizeof err) == 0);
    CHECK(r.train.epochs == 9);
    kd_recipe_t full;
    CHECK(parse(full_recipe, &full) == 0);
    full.train.epochs = 9;
    CHECK(memcmp(&r, &full, sizeof r) == 0);

    /* kd_recipe_write -> kd_recipe_load gives the same struct */
    char out[1200];
    snprintf(out, sizeof out, "%s/resolved.yaml", dir);
    CHECK(kd_recipe_write(&r, out, err, sizeof err) == 0);
    kd_recipe_t back;
    CHECK(kd_recipe_load(out, NULL, 0, &back, err, sizeof err) == 0);
    CHECK(memcmp(&r, &back, sizeof r) == 0);

    /* errors from a file name the file */
    f = fopen(path, "w");
    if (f) {
        fputs(MINIMAL "distill:\n  temprature: 3\n", f);
        fclose(f);
    }
    CHECK(kd_recipe_load(path, NULL, 0, &r, err, sizeof err) == -1);
    char want[1300];
    snprintf(want, sizeof want,
             "%s:5:3: unknown key 'temprature' in 'distill' (did you mean "
             "'temperature'?)\n  temprature: 3\n  ^",
             path);
    CHECK(strcmp(err, want) == 0);

    snprintf(path, sizeof path, "%s/missing.yaml", dir);
    CHECK(kd_recipe_load(path, NULL, 0, &r, err, sizeof err) == -1);
    CHECK_ERR_HAS(err, path);
    CHECK_ERR_HAS(err, "cannot open");

    /* data paths */
    CHECK(parse(full_recipe, &r) == 0);
    kd_recipe_data_path(&r, r.data.train_images, out, sizeof out);
    CHECK(strcmp(out, "/data/fm/a.gz") == 0);
    kd_recipe_data_path(&r, r.data.test_labels, out, sizeof out);
    CHECK(strcmp(out, "/abs/d.gz") == 0);
    strcpy(r.data.dir, "rel/");
    kd_recipe_data_path(&r, "x.gz", out, sizeof out);
    CHECK(strcmp(out, "rel/x.gz") == 0);
}

static void test_reference(void) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    kd_recipe_print_reference(f);
    fclose(f);
    CHECK_ERR_HAS(text, "| `distill.temperature` | number | `4` | > 0 and <= 100 |");
    CHECK_ERR_HAS(text, "| `train.batch_size` | integer | `128` | between 1 and 65536 |");
    CHECK_ERR_HAS(text, "| `cluster.consistency` | enum | `sync` | sync, async, ssp |");
    CHECK_ERR_HAS(text, "| `student.layers` | layer list | `[]` |");
    CHECK_ERR_HAS(text, "| `student.gpt.layers` | integer | `0` | between 0 and 64 |");
    CHECK_ERR_HAS(text, "| `maxpool2d` | `stride` | integer | = kernel |");
    free(text);
}

/* Random bytes, truncations and byte flips of a real recipe: an error or a recipe, never a
 * crash; errors always name the file. */
static void test_garbage(void) {
    uint64_t s = 0x9e3779b97f4a7c15ull;
    size_t flen = strlen(full_recipe);
    char buf[4096];
    int errors = 0, bad_msgs = 0;
    for (int it = 0; it < 1200; it++) {
        size_t n;
        if (it < 300) { /* random bytes, biased to YAML punctuation */
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            n = (size_t)(s >> 33) % 300;
            static const char alpha[] = ":-[]{},&*!|>'\"%@`#? \n\tab01.e";
            for (size_t i = 0; i < n; i++) {
                s = s * 6364136223846793005ull + 1442695040888963407ull;
                unsigned v = (unsigned)(s >> 40);
                buf[i] = (v & 1) ? alpha[(v >> 1) % (sizeof alpha - 1)] : (char)(v >> 8);
            }
        } else if (it < 300 + 600) { /* every truncation (stepping) */
            n = (size_t)(it - 300) * flen / 600;
            memcpy(buf, full_recipe, n);
        } else { /* a few flipped bytes */
            n = flen;
            memcpy(buf, full_recipe, n);
            for (int k = 0; k < 3; k++) {
                s = s * 6364136223846793005ull + 1442695040888963407ull;
                buf[(s >> 33) % n] = (char)(s >> 20);
            }
        }
        kd_recipe_t r;
        err[0] = 0;
        int rc = kd_recipe_parse("g.yaml", buf, n, NULL, 0, &r, err, sizeof err);
        if (rc != 0) {
            errors++;
            if (strncmp(err, "g.yaml:", 7) != 0) {
                bad_msgs++;
                if (bad_msgs < 3) fprintf(stderr, "bad message: %s\n", err);
            }
        } else {
            CHECK(r.student.n_layers >= 1 && r.name[0]);
        }
    }
    CHECK(errors > 300); /* nearly every input above is invalid */
    CHECK(bad_msgs == 0);
}

/* The helpers other YAML readers share (kdist inventory): did-you-mean and located errors. */
static void test_shared_messages(void) {
    const char *cands[] = {"hosts", "roles", "teacher_checkpoint"};
    char dym[96];
    kd_did_you_mean("hots", cands, 3, dym, sizeof dym);
    CHECK(strcmp(dym, " (did you mean 'hosts'?)") == 0);
    kd_did_you_mean("teacher", cands, 3, dym, sizeof dym); /* a prefix, 11 edits away */
    CHECK(strcmp(dym, " (did you mean 'teacher_checkpoint'?)") == 0);
    kd_did_you_mean("zzzzzz", cands, 3, dym, sizeof dym);
    CHECK(dym[0] == 0);
    kd_did_you_mean("x", cands, 0, dym, sizeof dym);
    CHECK(dym[0] == 0);

    /* 0-based line and column in; 1-based out, with the line and a caret */
    const char *doc = "a: 1\nb:\t[x\x01y]\nc: 3\n";
    CHECK(kd_loc_err(err, sizeof err, "d.yaml", doc, strlen(doc), 1, 4, "bad %s", "list") == -1);
    CHECK(strcmp(err, "d.yaml:2:5: bad list\nb:\t[x?y]\n  \t ^") == 0);
    /* a mark past the end (libyaml's at end of input): the message, an empty line, a caret */
    CHECK(kd_loc_err(err, sizeof err, "d.yaml", doc, strlen(doc), 9, 0, "end") == -1);
    CHECK(strcmp(err, "d.yaml:10:1: end\n\n^") == 0);
    /* a long line is cut; the caret stays within it */
    char line[400];
    memset(line, 'a', sizeof line - 1);
    line[sizeof line - 1] = 0;
    CHECK(kd_loc_err(err, sizeof err, "l.yaml", line, strlen(line), 0, 300, "far") == -1);
    const char *l2 = strchr(err, '\n'), *l3 = l2 ? strchr(l2 + 1, '\n') : NULL;
    CHECK(l3 && l3 - l2 - 1 == 160 && strlen(l3 + 1) <= 160 && l3[strlen(l3) - 1] == '^');
}

/* A GPT student on text: the keys, their defaults, the round trip, and what cannot go together. */
static void test_gpt_recipes(void) {
    const char *lm =
        "name: lm\n"
        "data: {format: text, files: [kjv.txt, more.txt], tokenizer: gpt2, stride: 128}\n"
        "student:\n  gpt: {layers: 2, width: 64, heads: 4, context: 128}\n"
        "teacher:\n  checkpoint: hf/gpt2\n  gpt: {layers: 12, width: 768, heads: 12, "
        "context: 1024, vocab: 50257}\n";
    kd_recipe_t r;
    CHECK(parse(lm, &r) == 0);
    CHECK(kd_recipe_is_lm(&r) && r.data.format == KD_DATA_TEXT && r.data.n_files == 2);
    CHECK(strcmp(r.data.files[1], "more.txt") == 0 && strcmp(r.data.tokenizer, "gpt2") == 0);
    CHECK(r.data.stride == 128 && fabsf(r.data.val_fraction - 0.05f) < 1e-7f);
    CHECK(r.student.gpt.layers == 2 && r.student.gpt.width == 64 && r.student.gpt.heads == 4 &&
          r.student.gpt.context == 128 && r.student.gpt.vocab == 0 && r.student.n_layers == 0);
    CHECK(r.teacher.gpt.layers == 12 && r.teacher.gpt.vocab == 50257);
    char *yaml = kd_recipe_to_yaml(&r);
    kd_recipe_t back;
    CHECK(parse(yaml, &back) == 0 && memcmp(&back, &r, sizeof r) == 0);
    free(yaml);
    kd_recipe_t images;
    CHECK(parse(MINIMAL, &images) == 0 && !kd_recipe_is_lm(&images) &&
          strcmp(images.data.tokenizer, "bytes") == 0);

    expect_err("name: t\ndata: {format: text, files: [a]}\nstudent:\n  layers: [{type: relu}]\n"
               "  gpt: {layers: 2}\n",
               4, 11, "give student.layers or student.gpt, not both", NULL);
    expect_err(
        "name: t\ndata: {format: tokens, files: [a.bin]}\nstudent:\n  layers: [{type: relu}]\n", 4,
        11, "data.format tokens needs a GPT student", NULL);
    expect_err("name: t\ndata: {dir: x}\nstudent:\n  gpt: {layers: 2}\n", 2, 7,
               "a GPT model needs data.format text or tokens", NULL);
    expect_err("name: t\ndata: {format: text}\nstudent:\n  gpt: {layers: 2}\n", 2, 7,
               "data.format text needs data.files", NULL);
    expect_err("name: t\ndata: {format: text, files: [a], tokenizer: sentencepiece}\n"
               "student: {gpt: {layers: 1}}\n",
               2, 45, "sentencepiece", "bytes, gpt2");
    expect_err("name: t\ndata: {format: text, files: [a]}\nstudent: {gpt: {layers: 1, widht: 8}}\n",
               3, 28, "unknown key 'widht'", "did you mean 'width'");
}

int main(void) {
    test_gpt_recipes();
    test_full();
    test_defaults();
    test_round_trip();
    test_overrides();
    test_numbers();
    test_errors();
    test_files();
    test_reference();
    test_garbage();
    test_shared_messages();
    return kd_test_done("test_recipe");
}
