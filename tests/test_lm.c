/* test_lm: a GPT recipe end to end through the kdist command, on a synthetic text whose
 * entropy is known: characters drawn independently with probabilities 1/2, 1/4, 1/8, 1/8, so
 * no model can do better than 1.75 bits per byte, and one that learnt the source gets close.
 * `kdist train` writes the student with its config.json and a summary with perplexity and bits
 * per byte; `kdist eval` dumps logits and token windows; `kdist sample` is the same for a seed;
 * bad text is refused naming the file.
 * On the cluster (`kdist run`: coordinator, teacher node, workers as processes): one sync worker
 * gives the in-process trainer's weights bit for bit and a text sample at each evaluation;
 * sync, async and ssp runs with a worker SIGKILLed mid-run complete with the ledger whole; a
 * coordinator SIGKILLed after a checkpoint resumes the run; a distilling LM recipe is refused with
 * the fix. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_rng.h"
#include "kd_test.h"
#include "kd_test_cluster.h"
#include "kd_util.h"

#define ENTROPY_BITS 1.75

static char kdist[KD_PATH_MAX];
static char out[65536];
static const char *tmp;

#define run(...) kd_test_run(out, sizeof out, __VA_ARGS__)

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

static void write_file(const char *path, const char *data, size_t len) {
    char err[KD_ERR_LEN];
    if (kd_write_file_atomic(path, data, len, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
}

/* n characters of the source: a with 1/2, b 1/4, c 1/8, d 1/8 */
static void write_source(const char *path, size_t n, uint64_t seed) {
    char *text = kd_xmalloc(n);
    kd_rng_t rng;
    kd_rng_init(&rng, seed);
    for (size_t i = 0; i < n; i++) {
        uint32_t u = kd_rng_below(&rng, 8);
        text[i] = u < 4 ? 'a' : u < 6 ? 'b' : u < 7 ? 'c' : 'd';
    }
    write_file(path, text, n);
    free(text);
}

/* A number of run_dir/summary.json (NAN when absent), and the run's status into status. */
static double summary_number(const char *run_dir, const char *key, char *status, size_t n) {
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/summary.json", run_dir);
    json_t *j = json_load_file(path, 0, NULL), *v = json_object_get(j, key);
    double x = json_is_number(v) ? json_number_value(v) : NAN;
    if (status) snprintf(status, n, "%s", json_string_value(json_object_get(j, "status")) ?: "");
    json_decref(j);
    return x;
}

/* Batches the run's ledger expects and applied, from its summary. */
static bool ledger_whole(const char *run_dir) {
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/summary.json", run_dir);
    json_t *j = json_load_file(path, 0, NULL), *l = json_object_get(j, "ledger");
    json_int_t expected = json_integer_value(json_object_get(l, "batches_expected"));
    json_int_t applied = json_integer_value(json_object_get(l, "batches_applied"));
    json_decref(j);
    fprintf(stderr, "  %s: %lld/%lld batches applied\n", run_dir, (long long)applied,
            (long long)expected);
    return expected > 0 && applied == expected;
}

/* `kdist run` of lm.yaml with the overrides (a NULL-terminated list) as run `name`, started in
 * the background with its output in <tmp>/<name>.txt; the run dir into dir. */
static pid_t start_cluster_run(const char *name, const char *const *overrides, bool resume,
                               char *dir, size_t n) {
    static char dir_arg[KD_PATH_MAX + 64], log[KD_PATH_MAX + 64];
    snprintf(dir, n, "%s/runs/%s", tmp, name);
    snprintf(dir_arg, sizeof dir_arg, "%s", dir);
    snprintf(log, sizeof log, "%s/%s.txt", tmp, name);
    char *argv[32] = {kdist, "run", (char *)tmp_path("lm.yaml"), "--run-dir", dir_arg};
    int argc = 5;
    if (resume) argv[argc++] = "--resume";
    for (int i = 0; overrides[i] && argc < 31; i++) argv[argc++] = (char *)overrides[i];
    return kd_test_start(log, argv);
}

/* Waits for the run to end; its output into out (and to stderr when it failed unexpectedly). */
static int finish_cluster_run(pid_t pid, const char *name, bool expect_ok) {
    int rc = kd_test_finish(pid, 400);
    char log[KD_PATH_MAX + 64];
    snprintf(log, sizeof log, "%s/%s.txt", tmp, name);
    kd_test_slurp(log, out, sizeof out);
    if ((rc == 0) != expect_ok) fprintf(stderr, "kdist run %s exited %d:\n%s\n", name, rc, out);
    return rc;
}

/* The student's text samples in the run's metrics.jsonl: how many, and whether the last is at
 * least 64 bytes of mostly the source's letters (the model learnt the alphabet). */
static bool last_sample_good(const char *run_dir, int *n_samples) {
    char path[KD_PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    FILE *f = fopen(path, "r");
    static char line[1 << 16];
    bool good = false;
    *n_samples = 0;
    while (f && fgets(line, sizeof line, f)) {
        json_t *j = json_loads(line, 0, NULL);
        const char *text = json_string_value(json_object_get(j, "samples/student"));
        if (text) {
            size_t n = strlen(text), letters = 0;
            for (size_t i = 0; i < n; i++) letters += text[i] && strchr("abcd", text[i]);
            (*n_samples)++;
            good = n >= 64 && letters >= n * 9 / 10;
        }
        json_decref(j);
    }
    if (f) fclose(f);
    return good;
}

/* A count of run_dir/summary.json's ledger (-1 when absent). */
static long ledger_count(const char *run_dir, const char *key) {
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/summary.json", run_dir);
    json_t *j = json_load_file(path, 0, NULL);
    json_t *v = json_object_get(json_object_get(j, "ledger"), key);
    long n = json_is_integer(v) ? (long)json_integer_value(v) : -1;
    json_decref(j);
    return n;
}

/* One sync worker computes what `kdist train` does: the same weights, bit for bit; also with
 * cluster.overlap over TCP, where every update is applied chunk by chunk, clipped (optim.clip_norm)
 * by the norm each push declares. */
static void test_cluster_equals_trainer(bool overlap) {
    char dir[KD_PATH_MAX + 64];
    const char *name = overlap ? "cluster_sync1_overlap" : "cluster_sync1";
    const char *over[] = {"cluster.workers=1", "cluster.consistency=sync",
                          overlap ? "cluster.overlap=true" : "cluster.overlap=false",
                          overlap ? "cluster.shared_memory=false" : "cluster.shared_memory=true",
                          NULL};
    pid_t pid = start_cluster_run(name, over, false, dir, sizeof dir);
    CHECK(pid > 0 && finish_cluster_run(pid, name, true) == 0);
    CHECK(strstr(out, "val bits per byte") && strstr(out, "tokens/s"));
    CHECK(ledger_whole(dir));
    const long streamed = ledger_count(dir, "pushes_streamed");
    CHECK(overlap ? streamed == (long)summary_number(dir, "steps", NULL, 0) : streamed == 0);
    CHECK(ledger_count(dir, "streams_undone") == 0);
    uint8_t *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    char err[KD_ERR_LEN], path[KD_PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/student.safetensors", dir);
    CHECK(kd_read_file(path, &a, &na, err, sizeof err) == 0);
    CHECK(kd_read_file(tmp_path("runs/lm_tiny/student.safetensors"), &b, &nb, err, sizeof err) ==
          0);
    CHECK(a && b && na == nb && memcmp(a, b, na) == 0);
    free(a);
    free(b);
    snprintf(path, sizeof path, "%s/config.json", dir);
    CHECK(kd_file_exists(path));
    char status[32];
    double bpb = summary_number(dir, "val_bits_per_byte", status, sizeof status);
    CHECK(strcmp(status, "completed") == 0 && bpb < ENTROPY_BITS + 0.15);
    /* a text sample at each evaluation (one per epoch) */
    int n_samples = 0;
    CHECK(last_sample_good(dir, &n_samples));
    long epochs = (long)summary_number(dir, "epochs", NULL, 0);
    CHECK(n_samples == epochs);
    if (n_samples != epochs) fprintf(stderr, "  %d samples in %ld epochs\n", n_samples, epochs);
}

/* `workers` workers in `consistency` mode, worker 1 SIGKILLed once the coordinator counts them
 * all and the run has taken its first step, no restart: the run completes with every batch
 * applied once. Paced by events: cluster.start_workers holds the first batches until every
 * worker is a member, so the kill comes at the start of a 40-epoch run however fast the
 * machine. */
static void test_cluster_worker_killed(const char *consistency, int workers) {
    char dir[KD_PATH_MAX + 64], log[KD_PATH_MAX + 64], name[64], n_arg[64], mode_arg[64];
    snprintf(name, sizeof name, "cluster_killed_%s", consistency);
    snprintf(n_arg, sizeof n_arg, "cluster.workers=%d", workers);
    snprintf(mode_arg, sizeof mode_arg, "cluster.consistency=%s", consistency);
    char hold_arg[64];
    snprintf(hold_arg, sizeof hold_arg, "cluster.start_workers=%d", workers);
    const char *over[] = {n_arg,
                          mode_arg,
                          hold_arg,
                          "train.epochs=40",
                          "cluster.heartbeat_ms=100",
                          "cluster.heartbeat_timeout_ms=1500",
                          NULL};
    pid_t pid = start_cluster_run(name, over, false, dir, sizeof dir);
    CHECK(pid > 0);
    if (pid <= 0) return;
    snprintf(log, sizeof log, "%s/status.txt", tmp);
    static char buf[65536];
    int live = 0;
    const double deadline = kd_now() + 120;
    while (live < workers && kd_now() < deadline && waitpid(pid, NULL, WNOHANG) == 0) {
        live = kd_test_status_members(kdist, dir, "worker", log, buf, sizeof buf);
        if (live < workers) usleep(50000);
    }
    CHECK(live == workers);
    pid_t victim = kd_test_launcher_pid(dir, "worker", 1);
    CHECK(victim > 0);
    if (victim > 0 && live == workers) kill(victim, SIGKILL);
    CHECK(finish_cluster_run(pid, name, true) == 0);
    CHECK(strstr(out, "lost                 worker 1 (died") != NULL);
    CHECK(ledger_whole(dir));
    char status[32];
    double bpb = summary_number(dir, "val_bits_per_byte", status, sizeof status);
    CHECK(strcmp(status, "completed") == 0 && bpb < ENTROPY_BITS + 0.15);
    fprintf(stderr, "  %s: %s, %d workers, worker 1 killed: %.4f bits per byte\n", name,
            consistency, workers, bpb);
    /* best/ holds the lowest validation loss of the 40 evaluations, as the summary says */
    double best = summary_number(dir, "best_val_loss", NULL, 0);
    CHECK(best <= summary_number(dir, "val_loss", NULL, 0));
    CHECK(run("%s eval %s/checkpoints/best/student.safetensors --recipe %s --split val", kdist, dir,
              tmp_path("lm.yaml")) == 0);
    const char *loss = strstr(out, "loss ");
    CHECK(loss && fabs(strtod(loss + 5, NULL) - best) < 1e-3);
}

/* Whether dir holds a periodic checkpoint (ckpt-<step>-<seq>.safetensors) already. */
static bool has_checkpoint(const char *dir) {
    DIR *d = opendir(dir);
    bool found = false;
    for (struct dirent *e; d && !found && (e = readdir(d));) {
        size_t n = strlen(e->d_name);
        found = strncmp(e->d_name, "ckpt-", 5) == 0 && n > 12 &&
                strcmp(e->d_name + n - 12, ".safetensors") == 0;
    }
    if (d) closedir(d);
    return found;
}

/* The coordinator SIGKILLed once it wrote a checkpoint: that run fails; `kdist run --resume`
 * continues it from the checkpoint and completes with the ledger whole. */
static void test_cluster_resume(void) {
    char dir[KD_PATH_MAX + 64], ckpt[KD_PATH_MAX + 96];
    const char *over[] = {"cluster.workers=2", "cluster.consistency=sync", "train.epochs=40",
                          "checkpoint.every_steps=20", NULL};
    pid_t pid = start_cluster_run("cluster_resume", over, false, dir, sizeof dir);
    CHECK(pid > 0);
    if (pid <= 0) return;
    snprintf(ckpt, sizeof ckpt, "%s/checkpoints", dir);
    bool saved = false;
    const double deadline = kd_now() + 120;
    while (!saved && kd_now() < deadline && waitpid(pid, NULL, WNOHANG) == 0) {
        saved = has_checkpoint(ckpt);
        if (!saved) usleep(50000);
    }
    CHECK(saved);
    pid_t coordinator = kd_test_launcher_pid(dir, "coordinator", 0);
    CHECK(coordinator > 0);
    if (coordinator > 0 && saved) kill(coordinator, SIGKILL);
    CHECK(finish_cluster_run(pid, "cluster_resume", false) != 0);
    pid = start_cluster_run("cluster_resume", over, true, dir, sizeof dir);
    CHECK(pid > 0 && finish_cluster_run(pid, "cluster_resume", true) == 0);
    CHECK(ledger_whole(dir));
    char log[KD_PATH_MAX + 128];
    static char text[1 << 20];
    snprintf(log, sizeof log, "%s/logs/coordinator-0.log", dir);
    kd_test_slurp(log, text, sizeof text);
    CHECK(strstr(text, "COORD-RESUME resumed from") != NULL);
    char status[32];
    double bpb = summary_number(dir, "val_bits_per_byte", status, sizeof status);
    CHECK(strcmp(status, "completed") == 0 && bpb < ENTROPY_BITS + 0.15);
}

/* CurveZMQ and elasticity with a language model: every connection encrypted and
 * authenticated (kdist keygen --cluster, weights over TCP: no shared memory), one async worker,
 * `kdist scale --workers 2` once it trains, then Ctrl-C once the status counts both: the run
 * stops cleanly with its ledger whole so far. Paced by events only: the run (100,000 epochs)
 * never ends by itself. */
static void test_cluster_curve_scaled(void) {
    char keys[KD_PATH_MAX + 64], keys_arg[KD_PATH_MAX + 96], dir[KD_PATH_MAX + 64];
    snprintf(keys, sizeof keys, "%s/keys", tmp);
    CHECK(run("%s keygen --cluster %s", kdist, keys) == 0);
    snprintf(keys_arg, sizeof keys_arg, "cluster.security.keys_dir=%s", keys);
    char roles[3][KD_PATH_MAX + 128];
    const char *role_keys[3][2] = {
        {"worker_keys", "worker"}, {"teacher_keys", "teacher"}, {"operator_keys", "client"}};
    for (int i = 0; i < 3; i++)
        snprintf(roles[i], sizeof roles[i], "cluster.security.%s=%s/%s.pub", role_keys[i][0], keys,
                 role_keys[i][1]);
    const char *over[] = {"cluster.workers=1",
                          "cluster.consistency=async",
                          "cluster.shared_memory=false",
                          "cluster.security.curve=true",
                          keys_arg,
                          roles[0],
                          roles[1],
                          roles[2],
                          "train.epochs=100000",
                          NULL};
    pid_t pid = start_cluster_run("cluster_curve_scaled", over, false, dir, sizeof dir);
    CHECK(pid > 0);
    if (pid <= 0) return;
    char log[KD_PATH_MAX + 128];
    snprintf(log, sizeof log, "%s/status_curve.txt", tmp);
    static char buf[65536];
    int live = 0;
    for (int want = 1; want <= 2; want++) {
        const double deadline = kd_now() + 120;
        live = 0;
        while (live < want && kd_now() < deadline && waitpid(pid, NULL, WNOHANG) == 0) {
            live = kd_test_status_members(kdist, dir, "worker", log, buf, sizeof buf);
            if (live < want) usleep(50000);
        }
        CHECK(live == want);
        if (want == 1 && live == 1) /* `kdist scale` finds client.key through the run dir */
            CHECK(run("%s scale %s --workers 2 --timeout 120", kdist, dir) == 0);
    }
    kill(pid, SIGINT); /* what Ctrl-C sends kdist run: exit 1, the run did not complete */
    CHECK(finish_cluster_run(pid, "cluster_curve_scaled", false) == 1);
    CHECK(strstr(out, "interrupted: the run ended with status 'stopped'") != NULL);
    char path[KD_PATH_MAX + 128];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    json_t *j = json_load_file(path, 0, NULL), *l = json_object_get(j, "ledger");
    CHECK(j && strcmp(json_string_value(json_object_get(j, "status")) ?: "", "stopped") == 0);
    /* every batch of the completed epochs applied, none of a later epoch than begun */
    const json_int_t per_epoch = 63, epochs = json_integer_value(json_object_get(j, "epochs"));
    const json_int_t applied = json_integer_value(json_object_get(l, "batches_applied"));
    const json_int_t expected = json_integer_value(json_object_get(l, "batches_expected"));
    CHECK(applied > 0 && applied >= epochs * per_epoch && applied <= expected &&
          expected <= (epochs + 1) * per_epoch);
    CHECK(json_integer_value(json_object_get(j, "workers_max")) == 2);
    fprintf(stderr, "  cluster_curve_scaled: stopped after %lld epochs, %lld/%lld batches\n",
            (long long)epochs, (long long)applied, (long long)expected);
    json_decref(j);
    static char text[1 << 20];
    snprintf(log, sizeof log, "%s/logs/coordinator-0.log", dir);
    kd_test_slurp(log, text, sizeof text);
    CHECK(strstr(text, "CurveZMQ") != NULL);
}

static double json_number(const char *text, const char *key) {
    char pat[128];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(text, pat);
    return p ? strtod(p + strlen(pat), NULL) : NAN;
}

int main(void) {
    tmp = kd_test_tmpdir("test_lm");
    const char *bin = getenv("KD_BIN_DIR");
    snprintf(kdist, sizeof kdist, "%s/kdist", bin ? bin : "../build/bin");
    write_source(tmp_path("source.txt"), 40000, 7);
    char recipe[4096];
    snprintf(recipe, sizeof recipe,
             "name: lm_tiny\n"
             "data: {format: text, dir: %s, files: [source.txt], tokenizer: bytes, "
             "val_fraction: 0.1, test_fraction: 0.1}\n"
             "student:\n  gpt: {layers: 1, width: 16, heads: 2, context: 32}\n"
             "optim: {name: adamw, lr: 1e-2, weight_decay: 0.01, clip_norm: 1.0}\n"
             "schedule: {name: cosine, warmup_steps: 10, min_lr: 1e-3}\n"
             "train: {epochs: 1, batch_size: 16, threads: 1}\n"
             "logging: {runs_dir: %s/runs}\n",
             tmp, tmp);
    write_file(tmp_path("lm.yaml"), recipe, strlen(recipe));

    /* train: the summary holds the language-model measures */
    double t0 = kd_now();
    CHECK(run("%s train %s", kdist, tmp_path("lm.yaml")) == 0);
    fprintf(stderr, "  kdist train: %.1f s\n%s", kd_now() - t0, out);
    CHECK(strstr(out, "bits per byte") != NULL && strstr(out, "tokens/s") != NULL);
    uint8_t *summary = NULL;
    size_t len;
    char err[KD_ERR_LEN];
    CHECK(kd_read_file(tmp_path("runs/lm_tiny/summary.json"), &summary, &len, err, sizeof err) ==
          0);
    if (summary) {
        double bpb = json_number((char *)summary, "val_bits_per_byte");
        double ppl = json_number((char *)summary, "val_perplexity");
        double loss = json_number((char *)summary, "val_loss");
        fprintf(stderr, "  validation: %.4f bits per byte (the source has %.2f), perplexity %.3f\n",
                bpb, ENTROPY_BITS, ppl);
        /* bytes tokenizer: one byte a token, so bits per byte = loss / ln 2; perplexity e^loss */
        CHECK(fabs(bpb - loss / M_LN2) < 1e-4 && fabs(ppl - exp(loss)) < 1e-3 * ppl);
        /* no model beats the entropy (up to the sampling noise of 4000 held-out bytes) */
        CHECK(bpb > ENTROPY_BITS - 0.05);
        /* and this one learnt the source: uniform over 4 letters is 2 bits, over bytes 8 */
        CHECK(bpb < ENTROPY_BITS + 0.15);
        CHECK(json_number((char *)summary, "tokens_per_sec") > 0);
    }
    free(summary);
    CHECK(kd_file_exists(tmp_path("runs/lm_tiny/config.json")));

    test_cluster_equals_trainer(false);
    test_cluster_equals_trainer(true);
    test_cluster_worker_killed("sync", 2);
    test_cluster_worker_killed("async", 3);
    test_cluster_worker_killed("ssp", 3);
    test_cluster_resume();
    test_cluster_curve_scaled();

    /* eval: the dumps have the shapes the issue gives */
    CHECK(run("%s eval %s/runs/lm_tiny --recipe %s --split val --dump-logits %s --dump-tokens %s "
              "data.val_windows=5",
              kdist, tmp, tmp_path("lm.yaml"), tmp_path("l.npy"), tmp_path("t.npy")) == 0);
    CHECK(strstr(out, "logits (5, 32, 257)") && strstr(out, "token windows (5, 33)") &&
          strstr(out, "perplexity"));
    uint8_t *npy = NULL;
    if (kd_read_file(tmp_path("l.npy"), &npy, &len, err, sizeof err) == 0)
        CHECK(len == 128 + 4 * 5 * 32 * 257 && strstr((char *)npy + 10, "(5, 32, 257)"));
    free(npy);
    npy = NULL;
    if (kd_read_file(tmp_path("t.npy"), &npy, &len, err, sizeof err) == 0)
        CHECK(len == 128 + 4 * 5 * 33 && strstr((char *)npy + 10, "'<i4'"));
    free(npy);

    /* sample: the same seed, the same text; another seed, another text */
    static char first[sizeof out], second[sizeof out];
    CHECK(run("%s sample %s/runs/lm_tiny --recipe %s --prompt abc --tokens 64 --seed 5", kdist, tmp,
              tmp_path("lm.yaml")) == 0);
    snprintf(first, sizeof first, "%s", out);
    CHECK(run("%s sample %s/runs/lm_tiny/student.safetensors --recipe %s --prompt abc --tokens 64 "
              "--seed 5",
              kdist, tmp, tmp_path("lm.yaml")) == 0);
    snprintf(second, sizeof second, "%s", out);
    CHECK(strcmp(first, second) == 0 && strncmp(first, "abc", 3) == 0 &&
          strlen(first) == 3 + 64 + 1);
    CHECK(run("%s sample %s/runs/lm_tiny --recipe %s --prompt abc --tokens 64 --seed 6", kdist, tmp,
              tmp_path("lm.yaml")) == 0);
    CHECK(strcmp(first, out) != 0);
    /* it learnt the letters: nearly everything sampled is one of them */
    int letters = 0;
    for (const char *p = first + 3; *p && *p != '\n'; p++) letters += *p >= 'a' && *p <= 'd';
    CHECK(letters >= 60);

    /* text the gpt2 tokenizer cannot read; the cluster; a missing file */
    char bad[256];
    memset(bad, 'x', sizeof bad);
    bad[100] = (char)0xff;
    write_file(tmp_path("bad.txt"), bad, sizeof bad);
    CHECK(run("%s train %s data.tokenizer=gpt2 data.files=bad.txt", kdist, tmp_path("lm.yaml")) ==
          1);
    CHECK(strstr(out, "bad.txt") && strstr(out, "byte offset 100"));
    CHECK(run("%s run %s distill.alpha=0.5 teacher.checkpoint=%s/runs/lm_tiny", kdist,
              tmp_path("lm.yaml"), tmp) == 2);
    CHECK(strstr(out, "there is no teacher: set teacher.gpt") != NULL);
    CHECK(run("%s train %s data.files=nowhere.txt", kdist, tmp_path("lm.yaml")) == 1);
    CHECK(strstr(out, "nowhere.txt") != NULL);

    if (!kd_test_failures) {
        char cmd[1100];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", tmp);
    }
    return kd_test_done("test_lm");
}
