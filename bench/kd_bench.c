#include "kd_bench.h"

#include <stdlib.h>
#include <time.h>

#include "kd_util.h"

double kd_bench_cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

kd_bench_timing_t kd_bench_time(kd_bench_work_fn fn, void *arg, int warmups, double seconds) {
    for (int i = 0; i < warmups; i++) fn(arg);
    long calls = 0;
    double t0 = kd_now(), c0 = kd_bench_cpu_now(), t;
    do {
        fn(arg);
        calls++;
        t = kd_now();
    } while (t - t0 < seconds);
    return (kd_bench_timing_t){(t - t0) / calls, (kd_bench_cpu_now() - c0) / calls, calls};
}

int kd_bench_trace(kd_bench_work_fn fn, void *arg, kd_sgemm_call_t *calls, int cap) {
    fn(arg);
    kd_sgemm_trace_begin(calls, cap);
    fn(arg);
    return kd_sgemm_trace_end();
}

double kd_gemm_replay_init(kd_gemm_replay_t *g, const kd_sgemm_call_t *calls, int n) {
    size_t max_a = 1, max_b = 1, max_c = 1;
    double flops = 0;
    for (int i = 0; i < n; i++) {
        size_t M = (size_t)calls[i].M, N = (size_t)calls[i].N, K = (size_t)calls[i].K;
        if (M * K > max_a) max_a = M * K;
        if (K * N > max_b) max_b = K * N;
        if (M * N > max_c) max_c = M * N;
        flops += 2.0 * M * N * K;
    }
    *g = (kd_gemm_replay_t){calls, n, kd_alloc_floats(max_a), kd_alloc_floats(max_b),
                            kd_alloc_floats(max_c)};
    /* any values in [0, 1) will do: sgemm's speed does not depend on them */
    for (size_t i = 0; i < max_a; i++) g->A[i] = (float)(i % 97) / 97.0f;
    for (size_t i = 0; i < max_b; i++) g->B[i] = (float)(i % 89) / 89.0f;
    return flops;
}

void kd_gemm_replay(void *arg) {
    kd_gemm_replay_t *g = arg;
    for (int i = 0; i < g->n; i++) {
        const kd_sgemm_call_t *c = &g->calls[i];
        int lda = c->ta == CblasNoTrans ? c->K : c->M;
        int ldb = c->tb == CblasNoTrans ? c->N : c->K;
        cblas_sgemm(CblasRowMajor, c->ta, c->tb, c->M, c->N, c->K, 1.0f, g->A, lda, g->B, ldb, 0.0f,
                    g->C, c->N);
    }
}

void kd_gemm_replay_free(kd_gemm_replay_t *g) {
    free(g->A);
    free(g->B);
    free(g->C);
    *g = (kd_gemm_replay_t){0};
}
