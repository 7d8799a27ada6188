/* kd_bench_step: one training step (forward + loss + backward + optimizer update) at batch 128
 * of the recipe models, against plain cblas_sgemm on exactly the GEMM shapes that step made
 * (recorded by the kd_sgemm trace), timed in the same run. The ratio sgemm-time / step-time is
 * the fraction of the machine's sgemm rate that a whole step achieves. Targets: MLP >= 60%,
 * CNN >= 40%.
 *   usage: kd_bench_step [--seconds S] [--threads N] [RECIPE ...] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_bench.h"
#include "kd_optim.h"
#include "kd_recipe.h"
#include "kd_rng.h"
#include "kd_train.h"

#define BATCH     128
#define MAX_TRACE 8192
#define WARMUPS   3 /* untimed calls before each timing */

typedef struct {
    const char *recipe;
    double target;
} bench_case_t;

static const bench_case_t default_cases[] = {
    {"recipes/fashion_mlp_student.yaml", 0.60},
    {"recipes/fashion_cnn_teacher.yaml", 0.40},
};

typedef struct {
    kd_model_t *m;
    kd_optim_t *opt;
    kd_loss_config_t loss;
    float *x, *dlogits;
    int32_t *y;
    long step;
} step_ctx_t;

static void train_step(void *arg) {
    step_ctx_t *s = arg;
    kd_train_gradient(s->m, &s->loss, s->x, s->y, NULL, BATCH,
                      kd_batch_key(1, 0, (uint32_t)s->step), s->dlogits, NULL);
    kd_optim_step(s->opt, s->m->params, s->m->grads, 0.01f);
    s->step++;
}

static int bench_one(const bench_case_t *bc, double seconds, int threads, int *below) {
    char err[KD_ERR_LEN];
    kd_recipe_t r;
    if (kd_recipe_load(bc->recipe, NULL, 0, &r, err, sizeof err) != 0) {
        fprintf(stderr, "kd_bench_step: %s\n", err);
        return -1;
    }
    /* Fashion-MNIST's shape, without loading the files. */
    kd_dataset_t shape = {
        .channels = 1, .height = 28, .width = 28, .sample_dim = 784, .num_classes = 10};
    step_ctx_t s = {.loss = r.distill.loss};
    s.loss.alpha = 0.0f;
    if (kd_model_from_recipe(&r, false, &shape, &s.m, err, sizeof err) != 0) {
        fprintf(stderr, "kd_bench_step: %s: %s\n", bc->recipe, err);
        return -1;
    }
    s.opt = kd_optim_new(&r.optim.cfg, s.m->n_params);
    s.x = kd_alloc_floats((size_t)BATCH * 784);
    s.dlogits = kd_alloc_floats((size_t)BATCH * 10);
    s.y = kd_xmalloc(BATCH * sizeof *s.y);
    kd_rng_t rng;
    kd_rng_init(&rng, 42);
    for (int i = 0; i < BATCH * 784; i++) s.x[i] = kd_rng_uniform(&rng);
    for (int i = 0; i < BATCH; i++) s.y[i] = (int32_t)kd_rng_below(&rng, 10);

    /* The GEMM shapes of one step. */
    static kd_sgemm_call_t calls[MAX_TRACE];
    int n_calls = kd_bench_trace(train_step, &s, calls, MAX_TRACE);
    if (n_calls > MAX_TRACE) {
        fprintf(stderr, "kd_bench_step: %s: %d GEMMs in one step, more than the trace holds (%d)\n",
                r.name, n_calls, MAX_TRACE);
        return -1;
    }
    kd_gemm_replay_t g;
    double flops = kd_gemm_replay_init(&g, calls, n_calls);

    double t_gemm = kd_bench_time(kd_gemm_replay, &g, WARMUPS, seconds).wall;
    double t_step = kd_bench_time(train_step, &s, WARMUPS, seconds).wall;
    double ratio = t_gemm / t_step;
    if (ratio < bc->target) (*below)++;
    printf("%-36s %7d %6d %10.2f %10.2f %8.1f %8.1f %7.1f%%   >= %.0f%% %s\n", r.name, threads,
           n_calls, t_step * 1e3, t_gemm * 1e3, flops / t_gemm * 1e-9, flops / t_step * 1e-9,
           100.0 * ratio, 100.0 * bc->target, ratio >= bc->target ? "ok" : "BELOW TARGET");
    printf("%-36s %.0f samples/s\n", "", BATCH / t_step);

    kd_gemm_replay_free(&g);
    free(s.x);
    free(s.dlogits);
    free(s.y);
    kd_optim_destroy(&s.opt);
    kd_model_destroy(&s.m);
    return 0;
}

int main(int argc, char **argv) {
    double seconds = 2.0;
    int threads_opt = -1;
    bench_case_t cases[16];
    int n_cases = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc)
            threads_opt = atoi(argv[++i]);
        else if (argv[i][0] != '-' && n_cases < 16)
            cases[n_cases++] = (bench_case_t){argv[i], 0.0};
        else {
            fprintf(stderr, "usage: kd_bench_step [--seconds S] [--threads N] [RECIPE ...]\n");
            return 2;
        }
    }
    if (n_cases == 0) {
        n_cases = 2;
        memcpy(cases, default_cases, sizeof default_cases);
    }
    int thread_counts[2] = {1, 2}, n_threads = 2;
    if (threads_opt > 0) {
        thread_counts[0] = threads_opt;
        n_threads = 1;
    }
    printf("training step at batch %d vs cblas_sgemm on the same shapes (same run)\n", BATCH);
    printf("%-36s %7s %6s %10s %10s %8s %8s %8s\n", "model", "threads", "gemms", "step ms",
           "sgemm ms", "sgemm GF", "step GF", "ratio");
    int below = 0;
    for (int t = 0; t < n_threads; t++) {
        kd_set_threads(thread_counts[t]);
        for (int c = 0; c < n_cases; c++)
            if (bench_one(&cases[c], seconds, thread_counts[t], &below) != 0) return 1;
    }
    printf("%s\n", below ? "some ratios are below their targets" : "all ratios meet their targets");
    return 0;
}
