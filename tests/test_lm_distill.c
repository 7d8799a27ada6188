/* test_lm_distill: token-level distillation of a GPT through the cluster (`kdist run`: a
 * coordinator, a teacher node and a worker as processes) with the teacher's per-position logits
 * in the persistent cache. A tiny teacher is trained first with `kdist train`; then:
 *  - a top-k run computes every window once through the teacher and completes with the ledger
 *    whole; a second run and an alpha/temperature sweep compute no teacher forward pass;
 *  - the sampled encoding gets its own entry per temperature (a re-sample), never the top-k's;
 *  - another context (other windows) gets a new entry;
 *  - two teacher nodes fill one cold cache, one is killed mid-fill: the run completes and the
 *    entry is the one a single node wrote, byte for byte;
 *  - a corrupted block is detected, recomputed and rewritten;
 *  - logits computed elsewhere (`kdist eval --dump-logits` stands in for a GPU teacher) are
 *    imported, dense and as top-k log-probability pairs, and distil with no teacher weights:
 *    the dense import in the teacher node's own batch slots gives its student bit for bit;
 *  - a teacher node whose own data gives other windows than the coordinator's refuses them;
 *  - a recipe that cannot be served (sampled with reverse KL, a padded teacher vocabulary
 *    without teacher.drop_vocab_padding) is refused with the fix. */
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <math.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kd_npy.h"
#include "kd_rng.h"
#include "kd_test.h"
#include "kd_test_cluster.h"
#include "kd_util.h"

static char kdist[KD_PATH_MAX];
static char out[65536];
static const char *tmp;

#define run(...) kd_test_run(out, sizeof out, __VA_ARGS__)

static const char *tmp_path(const char *name) {
    return kd_test_path(tmp, name);
}

/* Text with structure a bigger model learns better: words from a small vocabulary, each
 * followed by a likely next word (a Markov chain over 12 words). */
static void write_source(const char *path, size_t n) {
    static const char *const words[] = {"and ", "the ", "lord ", "said ", "unto ", "moses ",
                                        "of ",  "his ", "land ", "in ",   "that ", "day, "};
    FILE *f = fopen(path, "w");
    kd_rng_t rng;
    kd_rng_init(&rng, 11);
    size_t w = 0, len = 0;
    while (len < n) {
        len += (size_t)fprintf(f, "%s", words[w]);
        uint32_t u = kd_rng_below(&rng, 8);
        w = u < 5 ? (w * 7 + 3) % 12 : u < 7 ? (w + 1) % 12 : kd_rng_below(&rng, 12);
    }
    fclose(f);
}

static json_t *summary(const char *name) {
    char path[KD_PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/runs/%s/summary.json", tmp, name);
    return json_load_file(path, 0, NULL);
}

static long long teacher_count(json_t *s, const char *key) {
    return json_integer_value(json_object_get(json_object_get(s, "teacher"), key));
}

static bool ledger_whole(json_t *s) {
    json_t *l = json_object_get(s, "ledger");
    json_int_t want = json_integer_value(json_object_get(l, "batches_expected"));
    return want > 0 && json_integer_value(json_object_get(l, "batches_applied")) == want &&
           strcmp(json_string_value(json_object_get(s, "status")) ?: "", "completed") == 0;
}

/* kdist run of distill.yaml as `name` with extra overrides; its summary (caller frees). */
static json_t *distil(const char *name, const char *overrides) {
    int rc = run("%s run %s name=%s %s", kdist, tmp_path("distill.yaml"), name, overrides);
    if (rc != 0) fprintf(stderr, "kdist run %s exited %d:\n%s\n", name, rc, out);
    CHECK(rc == 0);
    json_t *s = summary(name);
    CHECK(s && ledger_whole(s));
    return s;
}

/* The entries (encoding directories) under the cache's fingerprint pairs, joined by spaces. */
static void cache_entries(char *buf, size_t n) {
    char dir[KD_PATH_MAX + 16];
    snprintf(dir, sizeof dir, "%s/cache", tmp);
    buf[0] = 0;
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char sub[KD_PATH_MAX + 300];
        snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name);
        DIR *d2 = opendir(sub);
        struct dirent *e2;
        while (d2 && (e2 = readdir(d2)))
            if (e2->d_name[0] != '.')
                snprintf(buf + strlen(buf), n - strlen(buf), "%.33s/%s ", e->d_name, e2->d_name);
        if (d2) closedir(d2);
    }
    if (d) closedir(d);
}

static int count_words(const char *s) {
    int n = 0;
    for (const char *p = s; (p = strchr(p, ' ')); p++) n++;
    return n;
}

/* Flips a byte inside the first block's records of the entry whose name ends in enc. */
static bool corrupt_entry(const char *enc) {
    char entries[4096];
    cache_entries(entries, sizeof entries);
    for (char *tok = strtok(entries, " "); tok; tok = strtok(NULL, " ")) {
        const char *slash = strrchr(tok, '/');
        if (!slash || strcmp(slash + 1, enc) != 0) continue;
        /* tok is "<first 33 of pair>/<enc>": find the pair by prefix */
        char dir[KD_PATH_MAX + 16];
        snprintf(dir, sizeof dir, "%s/cache", tmp);
        DIR *d = opendir(dir);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            if (strncmp(e->d_name, tok, (size_t)(slash - tok)) != 0) continue;
            char path[KD_PATH_MAX + 400];
            snprintf(path, sizeof path, "%s/%s/%s/logits.bin", dir, e->d_name, enc);
            int fd = open(path, O_RDWR);
            uint8_t b = 0;
            const off_t at = 64 + 32 + 5; /* file header, block 0's header, into its records */
            bool ok = fd >= 0 && pread(fd, &b, 1, at) == 1;
            b ^= 0x5a;
            ok = ok && pwrite(fd, &b, 1, at) == 1;
            if (fd >= 0) close(fd);
            closedir(d);
            return ok;
        }
        if (d) closedir(d);
    }
    return false;
}

/* Writes the top-k (id, log-probability) pairs of every position of dense (N, T, V) logits,
 * the form a vLLM teacher's logprobs take, as int64 ids and float32 values. */
static bool write_topk_pairs(const char *dense_path, int k, bool raw, const char *ids_path,
                             const char *lp_path) {
    kd_npy_array_t a;
    char err[KD_ERR_LEN];
    if (kd_npy_read(dense_path, KD_NPY_F32, &a, err, sizeof err) != 0 || a.ndim != 3) return false;
    const size_t N = a.shape[0], T = a.shape[1], V = a.shape[2], rows = N * T;
    const float *x = a.data;
    int32_t *ids = kd_xmalloc(rows * (size_t)k * sizeof *ids);
    float *lp = kd_alloc_floats(rows * (size_t)k);
    for (size_t r = 0; r < rows; r++) {
        const float *row = x + r * V;
        double mx = row[0], z = 0.0;
        for (size_t j = 1; j < V; j++) mx = fmax(mx, row[j]);
        for (size_t j = 0; j < V; j++) z += exp(row[j] - mx);
        for (int j = 0; j < k; j++) { /* the j-th largest, by selection */
            size_t best = SIZE_MAX;
            for (size_t c = 0; c < V; c++) {
                bool taken = false;
                for (int i = 0; i < j; i++) taken |= (size_t)ids[r * k + i] == c;
                if (!taken && (best == SIZE_MAX || row[c] > row[best])) best = c;
            }
            ids[r * k + j] = (int32_t)best;
            lp[r * k + j] = raw ? row[best] : (float)(row[best] - mx - log(z));
        }
    }
    const size_t shape[3] = {N, T, (size_t)k};
    bool ok = kd_npy_write_i32_nd(ids_path, ids, 3, shape, err, sizeof err) == 0 &&
              kd_npy_write_f32_nd(lp_path, lp, 3, shape, err, sizeof err) == 0;
    free(ids);
    free(lp);
    free(a.data);
    return ok;
}

/* Of an entry's logits.bin (format in kd_cache.c): how many blocks carry the written marker,
 * in total and in each half of the file; the block count in *n_blocks. -1 before the file. */
static long written_blocks(const char *path, long *n_blocks, long *low, long *high) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    uint8_t h[64];
    long n = -1;
    if (pread(fd, h, sizeof h, 0) == (ssize_t)sizeof h && memcmp(h, "KDLOGIT1", 8) == 0) {
        uint32_t block_rows, record_bytes;
        uint64_t rows;
        memcpy(&block_rows, h + 24, 4);
        memcpy(&record_bytes, h + 28, 4);
        memcpy(&rows, h + 32, 8);
        *n_blocks = block_rows ? (long)((rows + block_rows - 1) / block_rows) : 0;
        const off_t stride = 32 + (off_t)block_rows * record_bytes;
        n = *low = *high = 0;
        for (long b = 0; b < *n_blocks; b++) {
            uint8_t m[4] = {0};
            if (pread(fd, m, 4, 64 + b * stride) == 4 && memcmp(m, "KDCB", 4) == 0) {
                n++;
                ++*(b < *n_blocks / 2 ? low : high);
            }
        }
    }
    close(fd);
    return n;
}

static void signal_all(const pid_t *pids, int n, int sig) {
    for (int i = 0; i < n; i++) kill(pids[i], sig);
}

/* Two teacher nodes fill one cold cache at once (node 0 from the first window, node 1 from the
 * middle) and one is SIGKILLed mid-fill. Paced by signals, not by the machine's speed: both
 * nodes are stopped as soon as they exist and continued together, then stopped again the
 * moment each half of the entry holds a written block, so the kill always lands mid-fill. The
 * run completes with the ledger whole, and the entry is the one a single node wrote, byte for
 * byte. entry: the single node's logits.bin; pair: its directory's name. */
static void test_two_teachers_one_killed(const char *entry, const char *pair) {
    char dir_arg[KD_PATH_MAX + 32], run_dir[KD_PATH_MAX + 32], log[KD_PATH_MAX + 32],
        shared[KD_PATH_MAX + 400];
    snprintf(dir_arg, sizeof dir_arg, "cache.dir=%s/cache_shared", tmp);
    snprintf(run_dir, sizeof run_dir, "%s/runs/k1", tmp);
    snprintf(log, sizeof log, "%s/k1.log", tmp);
    snprintf(shared, sizeof shared, "%s/cache_shared/%s/topk4/logits.bin", tmp, pair);
    char *argv[] = {kdist,
                    "run",
                    (char *)tmp_path("distill.yaml"),
                    "name=k1",
                    dir_arg,
                    "cluster.teachers=2",
                    "cluster.heartbeat_ms=100",
                    "cluster.heartbeat_timeout_ms=1500",
                    NULL};
    pid_t run_pid = kd_test_start(log, argv);
    pid_t teachers[2] = {0, 0};
    double deadline = kd_test_now() + 60;
    while (kd_test_now() < deadline && !(teachers[0] > 0 && teachers[1] > 0)) {
        for (int t = 0; t < 2; t++)
            if (teachers[t] <= 0 && (teachers[t] = kd_test_launcher_pid(run_dir, "teacher", t)) > 0)
                kill(teachers[t], SIGSTOP);
        nanosleep(&(struct timespec){0, 1000 * 1000}, NULL);
    }
    CHECK(teachers[0] > 0 && teachers[1] > 0);
    if (!(teachers[0] > 0 && teachers[1] > 0)) return;
    signal_all(teachers, 2, SIGCONT);
    long written = -1, n_blocks = 0, low = 0, high = 0;
    deadline = kd_test_now() + 120;
    while (kd_test_now() < deadline) {
        written = written_blocks(shared, &n_blocks, &low, &high);
        if (low > 0 && high > 0) break;
        nanosleep(&(struct timespec){0, 200 * 1000}, NULL);
    }
    signal_all(teachers, 2, SIGSTOP);
    written = written_blocks(shared, &n_blocks, &low, &high);
    fprintf(stderr, "two teachers: node 0 killed with %ld of %ld blocks written (%ld + %ld)\n",
            written, n_blocks, low, high);
    CHECK(low > 0 && high > 0 && written < n_blocks);
    kill(teachers[0], SIGKILL);
    kill(teachers[1], SIGCONT);
    int rc = kd_test_finish(run_pid, 300);
    kd_test_slurp(log, out, sizeof out);
    CHECK(rc == 0);
    if (rc != 0) fprintf(stderr, "kdist run k1 exited %d:\n%s\n", rc, out);
    CHECK(strstr(out, "teacher 0 failed: killed by signal 9") != NULL);
    json_t *s = summary("k1");
    CHECK(s && ledger_whole(s));
    json_decref(s);
    /* every window whole, and the same bytes a single node wrote */
    CHECK(run("%s cache verify --dir %s/cache_shared", kdist, tmp) == 0);
    char want[96];
    snprintf(want, sizeof want, "%ld blocks: %ld ok, 0 missing, 0 corrupt", n_blocks, n_blocks);
    CHECK(strstr(out, want) != NULL);
    CHECK(kd_test_same_file(entry, shared));
}

/* A teacher node whose data.dir holds another text than the coordinator's: the paths are its
 * own, so only the windows' fingerprint in the Welcome can tell; it must refuse them. */
static void test_teacher_other_windows(void) {
    char other[KD_PATH_MAX + 16], run_dir[KD_PATH_MAX + 16], log[KD_PATH_MAX + 32];
    snprintf(other, sizeof other, "%s/other", tmp);
    snprintf(run_dir, sizeof run_dir, "%s/runs/w1", tmp);
    CHECK(kd_test_make_dirs(other) && kd_test_make_dirs(run_dir));
    char path[KD_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/source.txt", other);
    write_source(path, 50000);
    char *argv[32];
    int argc = kd_test_coordinator_argv(argv, tmp_path("distill.yaml"), run_dir);
    argv[argc++] = "name=w1";
    argv[argc] = NULL;
    snprintf(log, sizeof log, "%s/coordinator.log", run_dir);
    pid_t coord = kd_test_spawn(argv, log);
    char endpoint_file[KD_PATH_MAX + 64], endpoint[256] = "";
    snprintf(endpoint_file, sizeof endpoint_file, "%s/coordinator.endpoint", run_dir);
    CHECK(kd_test_wait_file(endpoint_file, 60) &&
          kd_test_read_text(endpoint_file, endpoint, sizeof endpoint));
    endpoint[strcspn(endpoint, "\n")] = 0;
    char dir_override[KD_PATH_MAX + 32];
    snprintf(dir_override, sizeof dir_override, "data.dir=%s", other);
    argc = kd_test_teacher_argv(argv, endpoint, "0", tmp_path("distill.yaml"));
    argv[argc++] = "name=w1";
    argv[argc++] = dir_override;
    argv[argc] = NULL;
    snprintf(log, sizeof log, "%s/teacher.log", run_dir);
    pid_t teacher = kd_test_spawn(argv, log);
    CHECK(kd_test_wait(teacher, 120) > 0); /* it refused and exited; it never streamed */
    static char text[1 << 16];
    kd_test_slurp(log, text, sizeof text);
    CHECK(strstr(text, "TEACHER-WINDOWS") && strstr(text, "other windows") &&
          strstr(text, "tokenizer bytes"));
    kill(coord, SIGTERM);
    CHECK(kd_test_wait(coord, 60) >= 0);
}

int main(void) {
    tmp = kd_test_tmpdir("test_lm_distill");
    const char *bin = getenv("KD_BIN_DIR");
    snprintf(kdist, sizeof kdist, "%s/kdist", bin ? bin : "../build/bin");
    write_source(tmp_path("source.txt"), 60000);
    char recipe[4096];
    const char *common =
        "data: {format: text, dir: %s, files: [source.txt], tokenizer: bytes, "
        "val_fraction: 0.1, test_fraction: 0.1, val_windows: 16, test_windows: 16}\n"
        "optim: {name: adamw, lr: 1e-2, weight_decay: 0.01, clip_norm: 1.0}\n"
        "schedule: {name: cosine, warmup_steps: 10, min_lr: 1e-3}\n"
        "train: {epochs: 1, batch_size: 16, threads: 1}\n"
        "logging: {runs_dir: %s/runs}\n";
    char data[1024];
    snprintf(data, sizeof data, common, tmp, tmp);
    snprintf(recipe, sizeof recipe,
             "name: teacher\n%sstudent:\n  gpt: {layers: 2, width: 32, heads: 2, context: 32}\n",
             data);
    kd_test_write_text(tmp_path("teacher.yaml"), recipe);
    CHECK(run("%s train %s", kdist, tmp_path("teacher.yaml")) == 0);
    snprintf(recipe, sizeof recipe,
             "name: distilled\n%s"
             "student:\n  gpt: {layers: 1, width: 16, heads: 2, context: 32}\n"
             "teacher:\n  gpt: {layers: 2, width: 32, heads: 2, context: 32}\n"
             "  checkpoint: %s/runs/teacher/student.safetensors\n  batch_size: 8\n"
             "distill: {alpha: 0.7, temperature: 1.0}\n"
             "cache: {dir: %s/cache, encoding: topk, topk: 4}\n"
             "cluster: {workers: 1, teachers: 1, consistency: sync}\n",
             data, tmp, tmp);
    kd_test_write_text(tmp_path("distill.yaml"), recipe);

    /* the first run computes every training window once through the teacher */
    json_t *first = distil("d1", "");
    const long long windows = teacher_count(first, "forward_samples");
    CHECK(windows > 1000 && teacher_count(first, "cache_misses") == windows);
    CHECK(teacher_count(first, "record_bytes_per_token") == 8 + 2 * 3 + 2 * 4);
    CHECK(json_is_number(json_object_get(json_object_get(first, "teacher"), "val_kl")));
    /* logits computed elsewhere: the teacher's on the training windows, dumped by kdist eval
     * in the node's batches of teacher.batch_size (8), imported with no teacher model */
    CHECK(run("%s eval %s/runs/teacher --recipe %s --model teacher --split train --dump-logits %s "
              "eval.batch_size=8",
              kdist, tmp, tmp_path("distill.yaml"), tmp_path("dense.npy")) == 0);
    CHECK(run("%s cache import --dir %s/imports --recipe %s --label gpu --encoding topk4 %s", kdist,
              tmp, tmp_path("distill.yaml"), tmp_path("dense.npy")) == 0);
    CHECK(strstr(out, "teacher 'import:gpu'") != NULL);
    char imported[KD_PATH_MAX + 160];
    snprintf(imported, sizeof imported,
             "cache.dir=%s/imports cache.import=gpu teacher.checkpoint=%s/nothing.safetensors", tmp,
             tmp);
    json_t *imp = distil("i1", imported);
    CHECK(teacher_count(imp, "forward_samples") == 0);
    char w1[KD_PATH_MAX + 64], w2[KD_PATH_MAX + 64];
    snprintf(w1, sizeof w1, "%s/runs/d1/student.safetensors", tmp);
    snprintf(w2, sizeof w2, "%s/runs/i1/student.safetensors", tmp);
    CHECK(kd_test_same_file(w1, w2)); /* the same logits, the same records, the same student */
    /* top-k pairs of log-probabilities: the rest's mass is what they leave */
    CHECK(
        write_topk_pairs(tmp_path("dense.npy"), 4, false, tmp_path("ids.npy"), tmp_path("lp.npy")));
    CHECK(
        run("%s cache import --dir %s/pairs --recipe %s --label vllm --encoding topk4 --vocab 257 "
            "--ids %s --logprobs %s",
            kdist, tmp, tmp_path("distill.yaml"), tmp_path("ids.npy"), tmp_path("lp.npy")) == 0);
    snprintf(imported, sizeof imported,
             "cache.dir=%s/pairs cache.import=vllm teacher.checkpoint=%s/nothing.safetensors", tmp,
             tmp);
    json_t *pairs = distil("i2", imported);
    const double l1 = json_real_value(json_object_get(first, "val_loss")),
                 l2 = json_real_value(json_object_get(pairs, "val_loss"));
    CHECK(fabs(l1 - l2) < 1e-3 * l1);
    /* a vocabulary smaller than an id; values of another shape; raw logits */
    CHECK(run("%s cache import --dir %s/pairs2 --recipe %s --label x --encoding topk4 --vocab 20 "
              "--ids %s --logprobs %s",
              kdist, tmp, tmp_path("distill.yaml"), tmp_path("ids.npy"), tmp_path("lp.npy")) == 1);
    CHECK(strstr(out, "outside the vocabulary [0, 20)") && strstr(out, "window 0 position"));
    CHECK(run("%s cache import --dir %s/pairs3 --recipe %s --label x --encoding topk4 --vocab 257 "
              "--ids %s --logprobs %s",
              kdist, tmp, tmp_path("distill.yaml"), tmp_path("ids.npy"),
              tmp_path("dense.npy")) == 1);
    CHECK(strstr(out, "same shape") != NULL);
    CHECK(
        write_topk_pairs(tmp_path("dense.npy"), 4, true, tmp_path("ids.npy"), tmp_path("raw.npy")));
    CHECK(run("%s cache import --dir %s/pairs4 --recipe %s --label x --encoding topk4 --vocab 257 "
              "--ids %s --logprobs %s",
              kdist, tmp, tmp_path("distill.yaml"), tmp_path("ids.npy"), tmp_path("raw.npy")) == 1);
    CHECK(strstr(out, "log-probabilit") != NULL);

    /* the same recipe again, and an alpha / temperature sweep: all from the cache (the sweep
     * with pushes of two batches: each held batch keeps its own teacher records) */
    json_t *again = distil("d2", "");
    CHECK(teacher_count(again, "forward_samples") == 0);
    CHECK(teacher_count(again, "cache_hits") == windows);
    json_t *sweep = distil("d3", "distill.alpha=0.3 distill.temperature=2 cluster.accumulate=2");
    CHECK(teacher_count(sweep, "forward_samples") == 0);
    char entries[4096];
    cache_entries(entries, sizeof entries);
    CHECK(count_words(entries) == 1 && strstr(entries, "/topk4 "));
    char pair[300] = "", entry[KD_PATH_MAX + 400];
    DIR *d = opendir(tmp_path("cache"));
    for (struct dirent *e; d && (e = readdir(d));)
        if (e->d_name[0] != '.') snprintf(pair, sizeof pair, "%s", e->d_name);
    if (d) closedir(d);
    snprintf(entry, sizeof entry, "%s/cache/%s/topk4/logits.bin", tmp, pair);
    test_two_teachers_one_killed(entry, pair);

    /* sampled: an entry of its own, drawn again at another temperature */
    json_t *sampled = distil("s1", "cache.encoding=sampled cache.samples=6");
    CHECK(teacher_count(sampled, "forward_samples") == windows);
    CHECK(teacher_count(sampled, "record_bytes_per_token") == 6 * 2);
    json_t *hot = distil("s2", "cache.encoding=sampled cache.samples=6 distill.temperature=2");
    CHECK(teacher_count(hot, "forward_samples") == windows);
    cache_entries(entries, sizeof entries);
    CHECK(count_words(entries) == 3 && strstr(entries, "/sampled6 ") &&
          strstr(entries, "/sampled6-t2 "));
    CHECK(run("%s cache ls --dir %s/cache", kdist, tmp) == 0);
    CHECK(strstr(out, "sampled6-t2 (12 bytes a token)") &&
          strstr(out, "topk4 (22 bytes a token)") && strstr(out, "windows (100.0%)") &&
          strstr(out, "context 32"));
    /* dense fp16 for a small vocabulary */
    json_t *dense = distil("f1", "cache.encoding=fp16");
    CHECK(teacher_count(dense, "record_bytes_per_token") == 2 * 257);

    /* a corrupted block is found, recomputed and rewritten; the next run reads it whole */
    CHECK(corrupt_entry("topk4"));
    json_t *healed = distil("d4", "");
    CHECK(teacher_count(healed, "cache_corrupt") == 1);
    CHECK(teacher_count(healed, "forward_samples") == 8); /* its group of teacher.batch_size */
    json_t *whole = distil("d5", "");
    CHECK(teacher_count(whole, "forward_samples") == 0 &&
          teacher_count(whole, "cache_corrupt") == 0);

    /* other windows (the context): another data fingerprint, a new entry */
    json_t *ctx = distil("c1", "student.gpt.context=16");
    CHECK(teacher_count(ctx, "forward_samples") > windows); /* windows of 17: more of them */
    cache_entries(entries, sizeof entries);
    CHECK(count_words(entries) == 5 && strstr(entries, "/fp16 "));

    test_teacher_other_windows();

    /* refusals that name the fix */
    CHECK(run("%s run %s name=bad1 cache.encoding=sampled distill.loss=reverse_kl", kdist,
              tmp_path("distill.yaml")) != 0);
    CHECK(strstr(out, "forward_kl only") != NULL);
    /* a teacher whose vocabulary is padded past the tokenizer's (300 for 257 ids): refused
     * unless its padding logits are dropped explicitly */
    CHECK(run("%s train %s name=padded student.gpt.vocab=300", kdist, tmp_path("teacher.yaml")) ==
          0);
    char padded[KD_PATH_MAX + 128];
    snprintf(padded, sizeof padded,
             "teacher.gpt.vocab=300 teacher.checkpoint=%s/runs/padded/student.safetensors", tmp);
    CHECK(run("%s run %s name=bad2 %s", kdist, tmp_path("distill.yaml"), padded) != 0);
    CHECK(strstr(out, "teacher.drop_vocab_padding: true") != NULL);
    char dropped[KD_PATH_MAX + 200];
    snprintf(dropped, sizeof dropped, "%s teacher.drop_vocab_padding=true", padded);
    json_t *pad = distil("p1", dropped);
    CHECK(teacher_count(pad, "forward_samples") == windows);

    json_t *all[] = {first, again, sweep, sampled, hot, dense, ctx, healed, whole, pad, imp, pairs};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) json_decref(all[i]);
    if (!kd_test_failures) {
        char cmd[KD_PATH_MAX + 16];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", tmp);
    }
    return kd_test_done("test_lm_distill");
}
