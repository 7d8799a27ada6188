/* kd_bench_teacher: the teacher node's two rates, each against a reference measured in the same
 * run (never an absolute target).
 *  1. Logits/s: teacher_logits fills a fresh cache for the training split (forward passes of
 *     exactly teacher.batch_size rows, cache puts), against the teacher's forward pass at the
 *     cblas_sgemm rate: the GEMM shapes of one forward pass of teacher.batch_size rows (the
 *     kd_sgemm trace) replayed with cblas_sgemm just before and just after the fill. Target
 *     >= 50%, with 1 and 2 OpenBLAS threads. Also printed: the bare forward pass (no table, no
 *     cache), its time per layer and the sgemm time per GEMM shape, to show where the rest goes;
 *     and the same ratio in process CPU time, which other work on the machine disturbs less
 *     (at 1 thread the fill thread is the only busy one; at 2, OpenBLAS's spinning counts too).
 *  2. Distillation samples/s with a warm cache: `kdist run RECIPE` on one cache dir, once to
 *     fill it, then again (summary.json's samples_per_sec), against the same recipe with
 *     distill.alpha=0 (the same student on hard labels). --repeat N pairs (default 3),
 *     alternating which runs first; the target (>= 90%) holds for the median ratio.
 * The teacher's weights: --teacher FILE, or freshly initialised ones (the speed does not depend
 * on the values) saved to a temporary file.
 *   usage: kd_bench_teacher [--teacher FILE] [--seconds S] [--threads N] [--epochs N]
 *                           [--subset N] [--repeat N] [--only logits|distill] [--keep] [RECIPE]
 * --subset N: data.train_subset (a shorter run); --keep: keep the temporary directory. */
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kd_bench.h"
#include "kd_checkpoint.h"
#include "kd_log.h"
#include "kd_recipe.h"
#include "kd_train.h"
#include "logits.h"

#define MAX_TRACE       4096
#define WARMUPS         2 /* untimed calls before each timing */
#define MAX_SEGMENTS    32
#define MAX_REPEAT      64
#define FILL_DEADLINE_S 1800.0
#define LOGITS_TARGET   0.50
#define DISTILL_TARGET  0.90

typedef struct {
    const char *recipe;
    const char *teacher; /* --teacher, or NULL: fresh weights */
    double seconds;
    int threads; /* 0: 1 and 2 */
    int epochs, repeat;
    long subset; /* data.train_subset (0: the whole split) */
    bool logits, distill;
    bool keep; /* keep the temporary directory (run outputs, logs) */
} options_t;

static char bin_dir[1024], tmp_dir[] = "/tmp/kd_bench_teacher.XXXXXX";
static char teacher_path[KD_PATH_MAX];

static void die(const char *what) {
    fprintf(stderr, "kd_bench_teacher: %s\n", what);
    rmdir(tmp_dir); /* only when still empty: otherwise its files tell what happened */
    exit(1);
}

/* ---- the forward pass, as work to time ----------------------------------------------------- */

typedef struct {
    kd_model_t *m;
    const float *x;
    int rows;
} forward_ctx_t;

static void forward_pass(void *arg) {
    forward_ctx_t *f = arg;
    kd_model_forward(f->m, f->x, f->rows, false, 0);
}

/* ---- 1. logits/s against the sgemm rate ------------------------------------------------------ */

/* The teacher's forward pass of S rows, and the GEMMs it makes (traced once), cut into
 * segments of consecutive calls of one shape (one layer each: per-image conv GEMMs, a linear). */
typedef struct {
    kd_model_t *m;
    float *x; /* (S, D) real training images */
    forward_ctx_t f;
    kd_sgemm_call_t calls[MAX_TRACE];
    kd_gemm_replay_t g;
    kd_gemm_replay_t seg[MAX_SEGMENTS];
    int n_seg;
    double gflop; /* of the GEMMs of one pass */
} probe_t;

static void cut_segments(probe_t *p) {
    for (int i = 0; i < p->g.n; i++) {
        const kd_sgemm_call_t *c = &p->calls[i], *prev = i ? &p->calls[i - 1] : NULL;
        bool same = prev && c->ta == prev->ta && c->tb == prev->tb && c->M == prev->M &&
                    c->N == prev->N && c->K == prev->K;
        if (same) {
            p->seg[p->n_seg - 1].n++;
            continue;
        }
        if (p->n_seg == MAX_SEGMENTS) die("more GEMM shapes in one forward pass than expected");
        p->seg[p->n_seg++] = (kd_gemm_replay_t){c, 1, p->g.A, p->g.B, p->g.C};
    }
}

static probe_t *probe_new(const kd_recipe_t *r, const kd_dataset_t *train) {
    probe_t *p = kd_xcalloc(1, sizeof *p);
    char err[KD_ERR_LEN];
    if (kd_model_from_recipe(r, true, train, &p->m, err, sizeof err) != 0 ||
        kd_checkpoint_load(p->m, teacher_path, err, sizeof err) != 0)
        die(err);
    const int S = (int)r->teacher.batch_size;
    const size_t D = train->sample_dim;
    p->x = kd_alloc_floats((size_t)S * D);
    for (int i = 0; i < S; i++)
        kd_pixels_to_float(train->pixels + (size_t)i % train->n * D, D, p->x + (size_t)i * D);
    p->f = (forward_ctx_t){p->m, p->x, S};
    int n = kd_bench_trace(forward_pass, &p->f, p->calls, MAX_TRACE);
    if (n > MAX_TRACE) die("more GEMMs in one forward pass than the trace holds");
    p->gflop = kd_gemm_replay_init(&p->g, p->calls, n) * 1e-9;
    cut_segments(p);
    return p;
}

static void probe_free(probe_t **p) {
    kd_gemm_replay_free(&(*p)->g);
    free((*p)->x);
    kd_model_destroy(&(*p)->m);
    free(*p);
    *p = NULL;
}

/* One forward pass; layer_s gets each layer's seconds per pass. */
static kd_bench_timing_t time_forward(probe_t *p, double seconds, double *layer_s) {
    memset(p->m->forward_seconds, 0, sizeof p->m->forward_seconds);
    kd_bench_timing_t t = kd_bench_time(forward_pass, &p->f, WARMUPS, seconds);
    for (int i = 0; i < p->m->n_layers; i++)
        layer_s[i] = p->m->forward_seconds[i] / (double)(t.calls + WARMUPS);
    return t;
}

/* Fills a fresh cache under dir with teacher_logits: wall and process CPU seconds from the
 * fill's start to the last block in the table, and its statistics. */
static kd_bench_timing_t time_fill(const kd_recipe_t *base, const kd_dataset_t *train,
                                   const char *dir, teacher_logits_stats_t *st) {
    kd_recipe_t r = *base;
    snprintf(r.cache.dir, sizeof r.cache.dir, "%s", dir);
    char err[KD_ERR_LEN];
    teacher_logits_t *tl = teacher_logits_open(&r, train, err, sizeof err);
    if (!tl) die(err);
    double t0 = kd_now(), c0 = kd_bench_cpu_now();
    if (teacher_logits_start_fill(tl, 0, 1, err, sizeof err) != 0) die(err);
    const struct timespec poll = {0, 1000000}; /* 1 ms: the fill takes seconds */
    while (!teacher_logits_complete(tl)) {
        if (teacher_logits_failed(tl, err, sizeof err)) die(err);
        if (kd_now() - t0 > FILL_DEADLINE_S) die("the fill did not complete in 30 minutes");
        nanosleep(&poll, NULL);
    }
    kd_bench_timing_t t = {kd_now() - t0, kd_bench_cpu_now() - c0, 1};
    teacher_logits_stats(tl, st);
    teacher_logits_close(&tl);
    return t;
}

static void print_profile(probe_t *p, const double *layer_s, double seconds) {
    printf("%8s forward ms per layer:", "");
    for (int i = 0; i < p->m->n_layers; i++)
        if (layer_s[i] >= 5e-5)
            printf(" %s %.1f", kd_layer_kind_name(p->m->layers[i].spec.kind), layer_s[i] * 1e3);
    printf("\n%8s sgemm ms per shape (MxNxK x calls):", "");
    for (int s = 0; s < p->n_seg; s++) {
        const kd_sgemm_call_t *c = p->seg[s].calls;
        kd_bench_timing_t t =
            kd_bench_time(kd_gemm_replay, &p->seg[s], WARMUPS, seconds / p->n_seg);
        printf(" %dx%dx%d x%d %.1f", c->M, c->N, c->K, p->seg[s].n, t.wall * 1e3);
    }
    printf("\n");
}

/* What one thread count measured. */
typedef struct {
    int threads;
    kd_bench_timing_t before, after, fwd, fill; /* sgemm replay before and after the fill */
    teacher_logits_stats_t st;
    double layer_s[KD_MAX_LAYERS];
} logits_run_t;

/* Prints the row; returns whether the ratio is below the target. */
static bool print_logits_run(const logits_run_t *m, const probe_t *p, double S, size_t n_train) {
    double gemm_wall = (m->before.wall + m->after.wall) / 2;
    double gemm_cpu = (m->before.cpu + m->after.cpu) / 2;
    double n = (double)m->st.forward_samples, passes = (double)m->st.forward_batches;
    double bound = S / gemm_wall, fwd_rate = S / m->fwd.wall, rate = n / m->fill.wall;
    double ratio = rate / bound, cpu_ratio = (gemm_cpu / S) / (m->fill.cpu / n);
    printf("%8d %5.1f-%-5.1f %8.0f %9.0f %9.0f %7.1f%% %7.1f%% %7.1f%%   >= %.0f%% %s\n",
           m->threads, p->gflop / m->before.wall, p->gflop / m->after.wall, bound, fwd_rate, rate,
           100 * fwd_rate / bound, 100 * ratio, 100 * cpu_ratio, 100 * LOGITS_TARGET,
           ratio >= LOGITS_TARGET ? "ok" : "BELOW TARGET");
    printf("%8s fill: %.2f s (%.2f s CPU), %.0f samples in %.0f passes of %.0f, %llu blocks "
           "computed and put\n",
           "", m->fill.wall, m->fill.cpu, n, passes, S, (unsigned long long)m->st.cache_misses);
    printf("%8s CPU ms per pass of %.0f rows: sgemm %.1f, bare forward %.1f, fill %.1f\n", "", S,
           gemm_cpu * 1e3, m->fwd.cpu * 1e3, m->fill.cpu / passes * 1e3);
    if (m->st.forward_samples != n_train || m->st.cache_hits != 0)
        printf("%8s WARNING: a fresh cache should compute every sample once\n", "");
    return ratio < LOGITS_TARGET;
}

/* One thread count: the sgemm replay just before and just after the fill (their mean is the
 * bound: a machine shared with other work drifts), and the bare forward pass. */
static int bench_logits_at(const options_t *o, const kd_recipe_t *r, const kd_dataset_t *train,
                           probe_t *p, int threads) {
    logits_run_t m = {.threads = threads};
    kd_set_threads(threads);
    m.before = kd_bench_time(kd_gemm_replay, &p->g, WARMUPS, o->seconds);
    m.fwd = time_forward(p, o->seconds, m.layer_s);
    char dir[sizeof tmp_dir + 32];
    snprintf(dir, sizeof dir, "%s/cache_t%d", tmp_dir, threads);
    /* the fill runs `threads` lanes at one OpenBLAS thread each (teacher_logits_open sets it);
     * the replay after it runs at `threads` again */
    kd_recipe_t lanes = *r;
    lanes.train.threads = threads;
    m.fill = time_fill(&lanes, train, dir, &m.st);
    kd_set_threads(threads);
    m.after = kd_bench_time(kd_gemm_replay, &p->g, WARMUPS, o->seconds);
    bool below = print_logits_run(&m, p, (double)r->teacher.batch_size, train->n);
    print_profile(p, m.layer_s, o->seconds);
    return below;
}

static int bench_logits(const options_t *o, const kd_recipe_t *r, const kd_dataset_t *train) {
    printf("\n1. teacher logits/s: teacher_logits filling a fresh cache (%zu samples, passes of "
           "%ld rows)\n   vs the teacher's forward pass at the cblas_sgemm rate on the same GEMM "
           "shapes, timed\n   before and after the fill (same run); the bare forward pass beside "
           "them\n",
           train->n, r->teacher.batch_size);
    printf("%8s %11s %8s %9s %9s %8s %8s %8s\n", "threads", "sgemm GF", "bound/s", "forward/s",
           "logits/s", "fwd/bnd", "ratio", "cpu");
    probe_t *p = probe_new(r, train);
    int below = 0;
    if (o->threads > 0)
        below += bench_logits_at(o, r, train, p, o->threads);
    else
        for (int t = 1; t <= 2; t++) below += bench_logits_at(o, r, train, p, t);
    probe_free(&p);
    return below;
}

/* ---- 2. distillation with a warm cache against hard labels ----------------------------------- */

typedef struct {
    double rate;                                   /* summary.json samples_per_sec */
    long long forward_samples, cache_hits, misses; /* summary.json teacher.* */
} run_result_t;

static long long json_int_at(json_t *o, const char *key) {
    return (long long)json_integer_value(json_object_get(o, key));
}

/* `kdist run` of the recipe as <name> with extra overrides; summary.json's figures. */
static run_result_t kdist_run(const options_t *o, const char *name, const char *extra) {
    char cmd[8192], path[2048], subset[64] = "";
    if (o->subset > 0) snprintf(subset, sizeof subset, "data.train_subset=%ld", o->subset);
    snprintf(cmd, sizeof cmd,
             "'%s/kdist' run '%s' teacher.checkpoint='%s' train.epochs=%d %s %s name=%s "
             "logging.runs_dir='%s/runs' > '%s/%s.out' 2>&1",
             bin_dir, o->recipe, teacher_path, o->epochs, subset, extra, name, tmp_dir, tmp_dir,
             name);
    if (system(cmd) != 0) {
        fprintf(stderr, "kd_bench_teacher: `kdist run` failed; see %s/%s.out\n", tmp_dir, name);
        exit(1);
    }
    snprintf(path, sizeof path, "%s/runs/%s/summary.json", tmp_dir, name);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    if (!j) {
        fprintf(stderr, "kd_bench_teacher: %s: %s\n", path, jerr.text);
        exit(1);
    }
    json_t *t = json_object_get(j, "teacher");
    run_result_t res = {json_real_value(json_object_get(j, "samples_per_sec")),
                        json_int_at(t, "forward_samples"), json_int_at(t, "cache_hits"),
                        json_int_at(t, "cache_misses")};
    json_decref(j);
    return res;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* One pair: the warm distillation and the hard-label run, in the given order. */
static double run_pair(const options_t *o, int i, const char *distill_arg) {
    char warm_name[64], hard_name[64];
    snprintf(warm_name, sizeof warm_name, "distill_warm%d", i);
    snprintf(hard_name, sizeof hard_name, "hard%d", i);
    run_result_t warm, hard;
    if (i % 2 == 0) {
        warm = kdist_run(o, warm_name, distill_arg);
        hard = kdist_run(o, hard_name, "distill.alpha=0");
    } else {
        hard = kdist_run(o, hard_name, "distill.alpha=0");
        warm = kdist_run(o, warm_name, distill_arg);
    }
    double ratio = hard.rate > 0 ? warm.rate / hard.rate : 0;
    printf("%8d %12.0f %12.0f %7.1f%%  %s\n", i + 1, warm.rate, hard.rate, 100 * ratio,
           i % 2 == 0 ? "(distill first)" : "(hard-label first)");
    if (warm.forward_samples != 0 || warm.misses != 0)
        printf("%8s WARNING: the warm run computed %lld samples (%lld blocks missed): the cache "
               "was not warm\n",
               "", warm.forward_samples, warm.misses);
    return ratio;
}

static int bench_distill(const options_t *o) {
    char cache[sizeof tmp_dir + 64], distill_arg[sizeof cache + 64];
    snprintf(cache, sizeof cache, "%s/distill_cache", tmp_dir);
    snprintf(distill_arg, sizeof distill_arg, "cache.dir='%s'", cache);
    printf("\n2. distillation samples/s with a warm cache vs the same student on hard labels "
           "(distill.alpha=0)\n   `kdist run %s train.epochs=%d`, summary.json samples_per_sec "
           "(same run)\n",
           o->recipe, o->epochs);
    run_result_t cold = kdist_run(o, "distill_cold", distill_arg);
    printf("%8s cold cache (fills it): %.0f samples/s, the teacher computed %lld samples\n", "",
           cold.rate, cold.forward_samples);
    printf("%8s %12s %12s %8s\n", "pair", "distill", "hard-label", "ratio");
    double ratios[MAX_REPEAT];
    for (int i = 0; i < o->repeat; i++) ratios[i] = run_pair(o, i, distill_arg);
    qsort(ratios, (size_t)o->repeat, sizeof *ratios, by_value);
    double median = o->repeat % 2 ? ratios[o->repeat / 2]
                                  : (ratios[o->repeat / 2 - 1] + ratios[o->repeat / 2]) / 2;
    printf("%8s median ratio %.1f%% (range %.1f-%.1f%%)   >= %.0f%% %s\n", "", 100 * median,
           100 * ratios[0], 100 * ratios[o->repeat - 1], 100 * DISTILL_TARGET,
           median >= DISTILL_TARGET ? "ok" : "BELOW TARGET");
    return median < DISTILL_TARGET;
}

/* ---- main ---------------------------------------------------------------------------------- */

static void usage(void) {
    fprintf(stderr, "usage: kd_bench_teacher [--teacher FILE] [--seconds S] [--threads N] "
                    "[--epochs N] [--subset N] [--repeat N] [--only logits|distill] [--keep] "
                    "[RECIPE]\n");
    exit(2);
}

static void parse_args(int argc, char **argv, options_t *o) {
    *o = (options_t){.recipe = "recipes/fashion_distill.yaml",
                     .seconds = 2.0,
                     .epochs = 1,
                     .repeat = 3,
                     .logits = true,
                     .distill = true};
    for (int i = 1; i < argc; i++) {
        bool has = i + 1 < argc;
        if (strcmp(argv[i], "--teacher") == 0 && has)
            o->teacher = argv[++i];
        else if (strcmp(argv[i], "--seconds") == 0 && has)
            o->seconds = atof(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && has)
            o->threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--epochs") == 0 && has)
            o->epochs = atoi(argv[++i]);
        else if (strcmp(argv[i], "--subset") == 0 && has)
            o->subset = atol(argv[++i]);
        else if (strcmp(argv[i], "--repeat") == 0 && has)
            o->repeat = atoi(argv[++i]);
        else if (strcmp(argv[i], "--only") == 0 && has) {
            const char *what = argv[++i];
            o->logits = strcmp(what, "logits") == 0;
            o->distill = strcmp(what, "distill") == 0;
            if (!o->logits && !o->distill) usage();
        } else if (strcmp(argv[i], "--keep") == 0)
            o->keep = true;
        else if (argv[i][0] != '-')
            o->recipe = argv[i];
        else
            usage();
    }
    if (o->seconds <= 0 || o->epochs < 1 || o->repeat < 1 || o->repeat > MAX_REPEAT ||
        o->subset < 0)
        usage();
}

/* The teacher's weights: --teacher, or the recipe's teacher freshly initialised. */
static void teacher_weights(const options_t *o, const kd_recipe_t *r, const kd_dataset_t *train) {
    if (o->teacher) {
        snprintf(teacher_path, sizeof teacher_path, "%s", o->teacher);
        printf("teacher weights: %s\n", o->teacher);
        return;
    }
    char err[KD_ERR_LEN];
    kd_model_t *m = NULL;
    snprintf(teacher_path, sizeof teacher_path, "%s/teacher_init.safetensors", tmp_dir);
    if (kd_model_from_recipe(r, true, train, &m, err, sizeof err) != 0 ||
        kd_checkpoint_save(m, teacher_path, err, sizeof err) != 0)
        die(err);
    kd_model_destroy(&m);
    printf("teacher weights: freshly initialised (the speed does not depend on the values)\n");
}

int main(int argc, char **argv) {
    options_t o;
    parse_args(argc, argv, &o);
    kd_log_threshold = KD_LOG_WARN; /* the fill's progress lines would break up the tables */
    char self[1024];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0) die("cannot find my own executable");
    self[len] = 0;
    snprintf(bin_dir, sizeof bin_dir, "%s", dirname(self));
    if (!mkdtemp(tmp_dir)) die("cannot create a temporary directory in /tmp");

    char err[KD_ERR_LEN], subset[64];
    snprintf(subset, sizeof subset, "data.train_subset=%ld", o.subset);
    const char *overrides[] = {subset};
    kd_recipe_t r;
    kd_splits_t d;
    if (kd_recipe_load(o.recipe, overrides, 1, &r, err, sizeof err) != 0 ||
        kd_splits_load(&r, &d, err, sizeof err) != 0)
        die(err);
    if (d.train->n == 0) die("the training split is empty (is --subset at most data.val_size?)");
    printf("kd_bench_teacher: %s, teacher.batch_size %ld, temporary files in %s%s\n", o.recipe,
           r.teacher.batch_size, tmp_dir, o.keep ? " (kept)" : "");
    teacher_weights(&o, &r, d.train);
    snprintf(r.teacher.checkpoint, sizeof r.teacher.checkpoint, "%s", teacher_path);

    int below = 0;
    if (o.logits) below += bench_logits(&o, &r, d.train);
    kd_splits_destroy(&d);
    if (o.distill) below += bench_distill(&o);
    printf("%s\n", below ? "some ratios are below their targets" : "all ratios meet their targets");
    if (o.keep) return 0;
    char cmd[sizeof tmp_dir + 32];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    if (system(cmd) != 0) fprintf(stderr, "kd_bench_teacher: could not remove %s\n", tmp_dir);
    return 0;
}
