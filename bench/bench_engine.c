/* kd_bench_engine: training samples/s of `kdist run` (coordinator, teacher node and workers
 * as separate processes on loopback) with 1 and 2 workers, against the in-process trainer on
 * the same recipe, measured in the same run. Target: at one worker the distributed run loses
 * at most 20% against the in-process trainer. The three are measured in turn, --repeat times
 * (default 3), and compared by their medians: on a shared machine one measurement can be off
 * by a third either way.
 *   usage: kd_bench_engine [--epochs N] [--repeat N] [--consistency sync|async|ssp] [RECIPE ...] */
#include <jansson.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kd_recipe.h"
#include "kd_train.h"

static char bin_dir[1024];

static double in_process_rate(const char *recipe, const char *epochs_arg) {
    const char *overrides[] = {epochs_arg};
    kd_recipe_t r;
    char err[KD_ERR_LEN];
    kd_splits_t d;
    kd_model_t *m = NULL;
    kd_train_result_t res;
    if (kd_recipe_load(recipe, overrides, 1, &r, err, sizeof err) != 0 ||
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
static double cluster_rate(const char *recipe, const char *epochs_arg, int workers,
                           const char *consistency, const char *runs_dir) {
    /* the run's name: the recipe's file name without .yaml, and the worker count */
    char base[256], name[300], cmd[4096], path[1200];
    snprintf(base, sizeof base, "%s", strrchr(recipe, '/') ? strrchr(recipe, '/') + 1 : recipe);
    char *dot = strstr(base, ".yaml");
    if (dot) *dot = 0;
    snprintf(name, sizeof name, "%s_w%d", base, workers);
    snprintf(cmd, sizeof cmd,
             "'%s/kdist' run '%s' %s cluster.workers=%d cluster.teachers=1 "
             "cluster.consistency=%s name=%s logging.runs_dir='%s' > '%s/%s.out' 2>&1",
             bin_dir, recipe, epochs_arg, workers, consistency, name, runs_dir, runs_dir, name);
    if (system(cmd) != 0) {
        fprintf(stderr, "kd_bench_engine: `kdist run` failed; see %s/%s.out\n", runs_dir, name);
        return 0.0;
    }
    snprintf(path, sizeof path, "%s/%s/summary.json", runs_dir, name);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    double rate = j ? json_real_value(json_object_get(j, "samples_per_sec")) : 0.0;
    json_decref(j);
    return rate;
}

#define MAX_REPEAT 15

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *x, int n) {
    qsort(x, (size_t)n, sizeof *x, by_value);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

int main(int argc, char **argv) {
    int epochs = 1, repeat = 3;
    const char *consistency = "sync";
    const char *recipes[8];
    int n = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--epochs") == 0 && i + 1 < argc)
            epochs = atoi(argv[++i]);
        else if (strcmp(argv[i], "--repeat") == 0 && i + 1 < argc && atoi(argv[i + 1]) > 0 &&
                 atoi(argv[i + 1]) <= MAX_REPEAT)
            repeat = atoi(argv[++i]);
        else if (strcmp(argv[i], "--consistency") == 0 && i + 1 < argc)
            consistency = argv[++i];
        else if (argv[i][0] != '-' && n < 8)
            recipes[n++] = argv[i];
        else {
            fprintf(stderr,
                    "usage: kd_bench_engine [--epochs N] [--repeat N (1-%d)] "
                    "[--consistency C] [RECIPE ...]\n",
                    MAX_REPEAT);
            return 2;
        }
    }
    if (n == 0) {
        recipes[n++] = "recipes/fashion_mlp_student.yaml";
        recipes[n++] = "recipes/fashion_cnn_teacher.yaml";
    }
    char self[1024];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len <= 0) return 1;
    self[len] = 0;
    snprintf(bin_dir, sizeof bin_dir, "%s", dirname(self));
    char runs_dir[] = "/tmp/kd_bench_engine.XXXXXX";
    if (!mkdtemp(runs_dir)) return 1;
    char epochs_arg[64];
    snprintf(epochs_arg, sizeof epochs_arg, "train.epochs=%d", epochs);

    printf("training samples/s, %d epoch(s), %s: kdist run vs the in-process trainer (same run; "
           "medians of %d rounds)\n",
           epochs, consistency, repeat);
    printf("%-36s %12s %12s %12s %10s %10s\n", "recipe", "in-process", "1 worker", "2 workers",
           "1w/inproc", "2w/inproc");
    int below = 0;
    for (int i = 0; i < n; i++) {
        double rates[3][MAX_REPEAT];
        for (int k = 0; k < repeat; k++) {
            rates[0][k] = in_process_rate(recipes[i], epochs_arg);
            rates[1][k] = cluster_rate(recipes[i], epochs_arg, 1, consistency, runs_dir);
            rates[2][k] = cluster_rate(recipes[i], epochs_arg, 2, consistency, runs_dir);
            fprintf(stderr, "  round %d: in-process %.0f, 1 worker %.0f, 2 workers %.0f\n", k + 1,
                    rates[0][k], rates[1][k], rates[2][k]);
        }
        double local = median(rates[0], repeat), w1 = median(rates[1], repeat),
               w2 = median(rates[2], repeat);
        double r1 = local > 0 ? w1 / local : 0, r2 = local > 0 ? w2 / local : 0;
        if (r1 < 0.8) below++;
        printf("%-36s %12.0f %12.0f %12.0f %9.1f%% %9.1f%%  %s\n", recipes[i], local, w1, w2,
               100 * r1, 100 * r2, r1 >= 0.8 ? "ok (1 worker loses <= 20%)" : "BELOW TARGET");
    }
    printf("%s\n",
           below ? "some runs lose more than 20% at one worker" : "all runs meet the target");
    return 0;
}
