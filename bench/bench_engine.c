/* kd_bench_engine: training samples/s of `kdist run` (coordinator, teacher node and workers
 * as separate processes on loopback) with 1, 2 and 4 workers, against the in-process trainer
 * on the same recipe, measured in the same run, with the ratios against one worker (the
 * scaling) and against the in-process trainer (the cost of distribution). Target: at one
 * worker the distributed run loses at most 20% against the in-process trainer. Every setup is
 * measured in turn, --repeat times (default 3), and compared by its median: on a shared
 * machine one measurement can be off by a third either way.
 *   usage: kd_bench_engine [--epochs N] [--repeat N] [--consistency sync|async|ssp]
 *                          [--workers 1,2,4] [--json OUT] [section.key=value ...] [RECIPE ...] */
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kd_recipe.h"
#include "kd_train.h"

#define MAX_REPEAT    15
#define MAX_RECIPES   8
#define MAX_OVERRIDES 16
#define MAX_COUNTS    8 /* worker counts measured */

typedef struct {
    int epochs, repeat;
    const char *consistency, *json_out;
    const char *recipes[MAX_RECIPES];
    int n_recipes;
    const char *overrides[MAX_OVERRIDES]; /* train.epochs first, then the user's */
    int n_overrides;
    int workers[MAX_COUNTS];
    int n_counts;
} bench_opts_t;

static char bin_dir[1024];
static int failed_runs; /* their outputs are kept for a look; otherwise the runs are removed */

static double in_process_rate(const char *recipe, const bench_opts_t *o) {
    kd_recipe_t r;
    char err[KD_ERR_LEN];
    kd_splits_t d;
    kd_model_t *m = NULL;
    kd_train_result_t res;
    if (kd_recipe_load(recipe, o->overrides, o->n_overrides, &r, err, sizeof err) != 0 ||
        kd_splits_load(&r, &d, err, sizeof err) != 0) {
        fprintf(stderr, "kd_bench_engine: %s\n", err);
        exit(1);
    }
    kd_set_threads((int)r.train.threads);
    if (kd_model_from_recipe(&r, false, d.train, &m, err, sizeof err) != 0 ||
        kd_train_local(&r, m, NULL, &d, NULL, NULL, &res, err, sizeof err) != 0) {
        fprintf(stderr, "kd_bench_engine: %s\n", err);
        exit(1);
    }
    kd_model_destroy(&m);
    kd_splits_destroy(&d);
    return res.samples_per_sec;
}

/* Runs `kdist run` and returns summary.json's training samples/s (0 on failure). */
static double cluster_rate(const char *recipe, const bench_opts_t *o, int workers,
                           const char *runs_dir) {
    /* the run's name: the recipe's file name without .yaml, and the worker count */
    char base[256], name[300], cmd[8192], path[1200];
    snprintf(base, sizeof base, "%s", strrchr(recipe, '/') ? strrchr(recipe, '/') + 1 : recipe);
    char *dot = strstr(base, ".yaml");
    if (dot) *dot = 0;
    snprintf(name, sizeof name, "%s_w%d", base, workers);
    int len = snprintf(cmd, sizeof cmd, "'%s/kdist' run '%s'", bin_dir, recipe);
    for (int i = 0; i < o->n_overrides && len < (int)sizeof cmd; i++)
        len += snprintf(cmd + len, sizeof cmd - (size_t)len, " '%s'", o->overrides[i]);
    if (len < (int)sizeof cmd)
        snprintf(cmd + len, sizeof cmd - (size_t)len,
                 " cluster.workers=%d cluster.teachers=1 cluster.consistency=%s name=%s "
                 "logging.runs_dir='%s' > '%s/%s.out' 2>&1",
                 workers, o->consistency, name, runs_dir, runs_dir, name);
    if (system(cmd) != 0) {
        fprintf(stderr, "kd_bench_engine: `kdist run` failed; see %s/%s.out\n", runs_dir, name);
        failed_runs++;
        return 0.0;
    }
    snprintf(path, sizeof path, "%s/%s/summary.json", runs_dir, name);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    double rate = j ? json_real_value(json_object_get(j, "samples_per_sec")) : 0.0;
    json_decref(j);
    return rate;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *x, int n) {
    qsort(x, (size_t)n, sizeof *x, by_value);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* "1,2,4" -> {1, 2, 4}; each count 1..64, at most MAX_COUNTS of them. */
static int parse_counts(const char *s, bench_opts_t *o) {
    o->n_counts = 0;
    for (const char *p = s; *p;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > 64 || o->n_counts == MAX_COUNTS || (*end && *end != ','))
            return -1;
        o->workers[o->n_counts++] = (int)v;
        p = *end ? end + 1 : end;
    }
    return o->n_counts > 0 ? 0 : -1;
}

static int usage(void) {
    fprintf(stderr,
            "usage: kd_bench_engine [--epochs N] [--repeat N (1-%d)] [--consistency C]\n"
            "                       [--workers 1,2,4] [--json OUT] [section.key=value ...] "
            "[RECIPE ...]\n",
            MAX_REPEAT);
    return 2;
}

static int parse_args(int argc, char **argv, bench_opts_t *o) {
    static char epochs_arg[64];
    *o = (bench_opts_t){.epochs = 1, .repeat = 3, .consistency = "sync"};
    parse_counts("1,2,4", o);
    o->n_overrides = 1; /* slot 0: train.epochs, filled below */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--epochs") == 0 && v && atoi(v) > 0)
            o->epochs = atoi(argv[++i]);
        else if (strcmp(a, "--repeat") == 0 && v && atoi(v) > 0 && atoi(v) <= MAX_REPEAT)
            o->repeat = atoi(argv[++i]);
        else if (strcmp(a, "--consistency") == 0 && v)
            o->consistency = argv[++i];
        else if (strcmp(a, "--workers") == 0 && v && parse_counts(v, o) == 0)
            i++;
        else if (strcmp(a, "--json") == 0 && v)
            o->json_out = argv[++i];
        else if (a[0] != '-' && strchr(a, '=') && o->n_overrides < MAX_OVERRIDES)
            o->overrides[o->n_overrides++] = a;
        else if (a[0] != '-' && !strchr(a, '=') && o->n_recipes < MAX_RECIPES)
            o->recipes[o->n_recipes++] = a;
        else
            return usage();
    }
    if (o->n_recipes == 0) {
        o->recipes[o->n_recipes++] = "recipes/fashion_mlp_student.yaml";
        o->recipes[o->n_recipes++] = "recipes/fashion_cnn_teacher.yaml";
    }
    snprintf(epochs_arg, sizeof epochs_arg, "train.epochs=%d", o->epochs);
    o->overrides[0] = epochs_arg;
    return 0;
}

/* One recipe's medians: [0] the in-process trainer, [1 + k] o->workers[k] workers. */
static void measure(const char *recipe, const bench_opts_t *o, const char *runs_dir,
                    double *medians) {
    double rates[1 + MAX_COUNTS][MAX_REPEAT];
    for (int r = 0; r < o->repeat; r++) { /* setups alternate, so drift hits them alike */
        rates[0][r] = in_process_rate(recipe, o);
        fprintf(stderr, "  round %d: in-process %.0f", r + 1, rates[0][r]);
        for (int k = 0; k < o->n_counts; k++) {
            rates[1 + k][r] = cluster_rate(recipe, o, o->workers[k], runs_dir);
            fprintf(stderr, ", %d worker(s) %.0f", o->workers[k], rates[1 + k][r]);
        }
        fprintf(stderr, "\n");
    }
    for (int k = 0; k <= o->n_counts; k++) medians[k] = median(rates[k], o->repeat);
}

static double ratio(double a, double b) {
    return b > 0 ? a / b : 0.0;
}

/* Prints the recipe's table and returns whether one worker meets the 20% target. */
static bool report(const char *recipe, const bench_opts_t *o, const double *med, json_t *out) {
    double local = med[0], one = 0;
    for (int k = 0; k < o->n_counts; k++)
        if (o->workers[k] == 1) one = med[1 + k];
    printf("\n%s\n  %-12s %12s %14s %14s\n", recipe, "setup", "samples/s", "vs 1 worker",
           "vs in-process");
    printf("  %-12s %12.0f %14s %13.1f%%\n", "in-process", local, "-", 100.0);
    json_t *jr = json_pack("{s:s, s:f, s:[]}", "recipe", recipe, "in_process", local, "workers");
    for (int k = 0; k < o->n_counts; k++) {
        char label[32];
        snprintf(label, sizeof label, "%d worker%s", o->workers[k], o->workers[k] > 1 ? "s" : "");
        double w = med[1 + k];
        printf("  %-12s %12.0f %13.2fx %13.1f%%\n", label, w, ratio(w, one), 100 * ratio(w, local));
        json_array_append_new(json_object_get(jr, "workers"),
                              json_pack("{s:i, s:f, s:f, s:f}", "workers", o->workers[k],
                                        "samples_per_sec", w, "vs_one_worker", ratio(w, one),
                                        "vs_in_process", ratio(w, local)));
    }
    json_array_append_new(out, jr);
    if (one <= 0) return true; /* no one-worker setup measured: no target to judge */
    bool ok = ratio(one, local) >= 0.8;
    printf("  %s\n", ok ? "ok (1 worker loses <= 20% against in-process)" : "BELOW TARGET");
    return ok;
}

int main(int argc, char **argv) {
    bench_opts_t o;
    if (parse_args(argc, argv, &o) != 0) return 2;
    char self[1024];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0) return 1;
    self[len] = 0;
    snprintf(bin_dir, sizeof bin_dir, "%s", dirname(self));
    char runs_dir[] = "/tmp/kd_bench_engine.XXXXXX";
    if (!mkdtemp(runs_dir)) return 1;

    printf("training samples/s, %s consistency, %ld CPU(s); kdist run with", o.consistency,
           sysconf(_SC_NPROCESSORS_ONLN));
    for (int k = 0; k < o.n_counts; k++) printf("%s %d", k ? "," : "", o.workers[k]);
    printf(" worker(s) vs the in-process trainer (same run; medians of %d rounds); overrides:",
           o.repeat);
    for (int i = 0; i < o.n_overrides; i++) printf(" %s", o.overrides[i]);
    printf("\n");
    fflush(stdout);
    json_t *results = json_array();
    int below = 0;
    for (int i = 0; i < o.n_recipes; i++) {
        double med[1 + MAX_COUNTS] = {0};
        measure(o.recipes[i], &o, runs_dir, med);
        below += !report(o.recipes[i], &o, med, results);
        fflush(stdout);
    }
    printf("\n%s\n",
           below ? "some runs lose more than 20% at one worker" : "all runs meet the target");
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    for (int k = 0; k < o.n_counts; k++)
        if (o.workers[k] > cpus) {
            printf("(%d workers share %ld CPU(s) with the coordinator and the teacher node: "
                   "more workers than cores cannot be faster)\n",
                   o.workers[k], cpus);
            break;
        }
    if (o.json_out && json_dump_file(results, o.json_out, JSON_INDENT(2)) != 0)
        fprintf(stderr, "kd_bench_engine: cannot write %s\n", o.json_out);
    json_decref(results);
    char rm[64 + sizeof runs_dir];
    snprintf(rm, sizeof rm, "rm -rf '%s'", runs_dir);
    if (failed_runs == 0 && system(rm) != 0)
        fprintf(stderr, "kd_bench_engine: cannot remove %s\n", runs_dir);
    return 0;
}
