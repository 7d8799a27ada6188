/* kd_bench: what the benches share. Timing a piece of work by repeating it, and the reference
 * every bench ratio is measured against: the GEMMs that work made (the kd_sgemm trace) replayed
 * with plain cblas_sgemm on the same shapes. */
#ifndef KD_BENCH_H
#define KD_BENCH_H

#include "kd_kernels.h"

/* One piece of work to time or trace; arg is its context. */
typedef void (*kd_bench_work_fn)(void *arg);

typedef struct {
    double wall, cpu; /* seconds per call; cpu is the whole process's CPU time */
    long calls;       /* the timed calls, without the warm-up ones */
} kd_bench_timing_t;

/* The process's CPU seconds so far (every thread's). */
double kd_bench_cpu_now(void);

/* Runs fn(arg) `warmups` times untimed (caches, workspace, BLAS threads), then repeatedly for
 * at least `seconds` of wall time. */
kd_bench_timing_t kd_bench_time(kd_bench_work_fn fn, void *arg, int warmups, double seconds);

/* Records into calls (at most cap) the GEMMs of one fn(arg), made after one untraced call that
 * sizes the workspaces. Returns how many GEMMs that call made: more than cap means the trace
 * lost some. */
int kd_bench_trace(kd_bench_work_fn fn, void *arg, kd_sgemm_call_t *calls, int cap);

/* calls[0..n) replayed with cblas_sgemm, all on the same operands (big enough for the
 * largest call: only the speed is wanted, not the products). */
typedef struct {
    const kd_sgemm_call_t *calls;
    int n;
    float *A, *B, *C;
} kd_gemm_replay_t;

/* Allocates and fills the operands for replaying calls[0..n) (the caller keeps calls alive and
 * frees the operands with kd_gemm_replay_free); returns the flops of one replay. */
double kd_gemm_replay_init(kd_gemm_replay_t *g, const kd_sgemm_call_t *calls, int n);
/* One replay of every call; a kd_bench_work_fn on a kd_gemm_replay_t. */
void kd_gemm_replay(void *g);
void kd_gemm_replay_free(kd_gemm_replay_t *g);

#endif
