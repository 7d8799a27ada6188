/* kd_kernels_gpt: the transformer kernels of GPT-2 (see kd_kernels.h), each fast version on
 * OpenBLAS with a naive reference loop beside it for the tests, after llm.c's train_gpt2.c.
 * Shapes in the comments: N rows (B*T), C channels, NH heads of hs = C/NH, OC/IC out/in.
 *
 * Speed (bench/bench_gpt.c): the elementwise passes are written as plain loops over LANES
 * independent accumulators with a polynomial exp, so gcc vectorises them (glibc's expf and
 * tanhf do not, and tanhf alone was a third of a training step); the hot ones are compiled
 * twice (target_clones: AVX2 and the baseline) and picked at load time. Both versions compute
 * the same bits: no FMA contraction (ISO C mode), and every reduction has the same LANES
 * partial sums in the same order whatever the vector width. The attention works on row tiles
 * of the causal lower triangle, so its GEMMs skip most of the masked upper half. */
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "kd_kernels.h"
#include "kd_util.h"

#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define KD_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef KD_VECTOR_CLONES
#define KD_VECTOR_CLONES
#endif

#define LANES 8 /* partial sums of every reduction: one AVX2 register, two SSE ones */

/* cond ? a : b, as bit masks: gcc if-converts a float ?: (and so vectorises its loop) only
 * under -fno-trapping-math, which kdist does not build with; this form it always does. */
static inline float select_f(bool cond, float a, float b) {
    uint32_t ua, ub;
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    const uint32_t m = -(uint32_t)cond, r = (ua & m) | (ub & ~m);
    float out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* e^x, Cephes' expf polynomial (within 2 ulp of expf on [-87, 88]); x is clamped to
 * [-87.3, 88.3] (so e^-inf is about 1e-38, not 0) and a NaN gives NaN. Inlined into a loop it
 * vectorises, which expf does not (n is rounded with the 1.5 * 2^23 trick: floorf would not). */
static inline float exp_poly(float x) {
    float xc = select_f(x > -87.3f, x, -87.3f); /* a NaN becomes the bound here ... */
    xc = select_f(xc < 88.3f, xc, 88.3f);
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* nearest */
    float r = xc - n * 0.693359375f; /* ln 2 in two parts: r exact to float precision */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return select_f(x == x, p * scale, x); /* ... and is given back here */
}

/* max of x (n >= 1) on the floats' bits, mapped to int32 in the floats' order (negative ones
 * flipped): a float max does not vectorise without -ffinite-math-only, an integer one does. A
 * NaN (of either sign) counts as beyond the infinities. */
static inline int32_t order_key(float x) {
    int32_t b;
    memcpy(&b, &x, sizeof b);
    return b ^ (int32_t)((uint32_t)(b >> 31) >> 1);
}

static inline float max_f(const float *x, int n) {
    int32_t mk = order_key(x[0]);
    for (int i = 1; i < n; i++) {
        const int32_t k = order_key(x[i]);
        mk = k > mk ? k : mk;
    }
    const int32_t b = mk ^ (int32_t)((uint32_t)(mk >> 31) >> 1);
    float out;
    memcpy(&out, &b, sizeof out);
    return out;
}

/* ---- the kernels' threads ---------------------------------------------------------------
 * The attention's per-head GEMMs are too small for OpenBLAS's threads to pay (a (64, 256, 32)
 * product is slower on two than on one), and the elementwise passes have none: these kernels
 * split their work over as many threads as OpenBLAS is set to (kd_set_threads), with OpenBLAS
 * itself at one thread inside (so each head's GEMMs run in the thread that owns the head).
 * A region splits [0, n) into contiguous ranges, one per thread, the caller taking the first;
 * no result depends on the split. One region at a time in the process: a caller that finds
 * the pool busy (another model in another thread) runs its whole range alone. */

#define MAX_THREADS 16

typedef void (*range_fn)(void *ctx, size_t lo, size_t hi, int worker);

static struct {
    pthread_mutex_t busy; /* held for a whole region */
    pthread_mutex_t mu;   /* guards the rest */
    pthread_cond_t start, finish;
    int started;         /* helper threads running (workers 1..started) */
    unsigned long round; /* one per region: helpers wake when it changes */
    range_fn fn;
    void *ctx;
    size_t n;
    int nw, pending;
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER,
          .mu = PTHREAD_MUTEX_INITIALIZER,
          .start = PTHREAD_COND_INITIALIZER,
          .finish = PTHREAD_COND_INITIALIZER};

static void range_of(size_t n, int w, int nw, size_t *lo, size_t *hi) {
    *lo = n * (size_t)w / (size_t)nw;
    *hi = n * (size_t)(w + 1) / (size_t)nw;
}

static void *pool_thread(void *arg) {
    const int w = (int)(intptr_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.round == seen) pthread_cond_wait(&pool.start, &pool.mu);
        seen = pool.round;
        if (w >= pool.nw) continue;
        const range_fn fn = pool.fn;
        void *ctx = pool.ctx;
        size_t lo, hi;
        range_of(pool.n, w, pool.nw, &lo, &hi);
        pthread_mutex_unlock(&pool.mu);
        fn(ctx, lo, hi, w);
        pthread_mutex_lock(&pool.mu);
        if (--pool.pending == 0) pthread_cond_signal(&pool.finish);
    }
    return NULL;
}

/* Starts helpers up to nw - 1 (pool.mu held); returns how many threads a region can have. */
static int pool_grow(int nw) {
    while (pool.started < nw - 1) {
        /* helpers take no signals: the process's handlers run in its own threads */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        pthread_t th;
        const int rc = pthread_create(&th, NULL, pool_thread, (void *)(intptr_t)(pool.started + 1));
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (rc != 0) break;
        pthread_detach(th);
        pool.started++;
    }
    return nw < pool.started + 1 ? nw : pool.started + 1;
}

/* The threads a region of n items, at least grain each, gets (unless the pool is busy). */
static int region_threads(size_t n, size_t grain) {
    int nw = openblas_get_num_threads();
    nw = nw < MAX_THREADS ? nw : MAX_THREADS;
    if (grain > 0 && (size_t)nw > n / grain) nw = (int)(n / grain);
    return nw;
}

/* fn over [0, n) in ranges of at least `grain` items, on at most `cap` threads (0: no cap);
 * blas: fn makes GEMMs. */
static void parallel_for(range_fn fn, void *ctx, size_t n, size_t grain, int cap, bool blas) {
    int nw = region_threads(n, grain);
    if (cap > 0 && nw > cap) nw = cap;
    if (nw <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        fn(ctx, 0, n, 0);
        return;
    }
    const int blas_threads = blas ? openblas_get_num_threads() : 0;
    if (blas) openblas_set_num_threads(1);
    pthread_mutex_lock(&pool.mu);
    nw = pool_grow(nw);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n = n;
    pool.nw = nw;
    pool.pending = nw - 1;
    pool.round++;
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.mu);
    size_t lo, hi;
    range_of(n, 0, nw, &lo, &hi);
    fn(ctx, lo, hi, 0);
    pthread_mutex_lock(&pool.mu);
    while (pool.pending > 0) pthread_cond_wait(&pool.finish, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    if (blas) openblas_set_num_threads(blas_threads);
    pthread_mutex_unlock(&pool.busy);
}

/* ---- Conv1D: y = x W + b, W [in, out] ---- */

void kd_conv1d_forward(float *out, const float *inp, const float *weight, const float *bias, int N,
                       int IC, int OC) {
    /* The bias seeds out, so the GEMM adds onto it (beta = 1) in its own pass. */
    if (bias)
        for (int n = 0; n < N; n++) memcpy(out + (size_t)n * OC, bias, (size_t)OC * sizeof(float));
    // out (N,OC) = inp (N,IC) @ weight (IC,OC)
    kd_sgemm(CblasNoTrans, CblasNoTrans, N, OC, IC, 1.0f, inp, IC, weight, OC, bias ? 1.0f : 0.0f,
             out, OC);
}

void kd_conv1d_forward_naive(float *out, const float *inp, const float *weight, const float *bias,
                             int N, int IC, int OC) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double acc = bias ? bias[o] : 0.0;
            for (int i = 0; i < IC; i++)
                acc += (double)inp[(size_t)n * IC + i] * weight[(size_t)i * OC + o];
            out[(size_t)n * OC + o] = (float)acc;
        }
}

void kd_conv1d_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, int N, int IC, int OC) {
    // dinp (N,IC) = dout (N,OC) @ weight^T (OC,IC)
    if (dinp)
        kd_sgemm(CblasNoTrans, CblasTrans, N, IC, OC, 1.0f, dout, OC, weight, OC, 0.0f, dinp, IC);
    // dweight (IC,OC) += inp^T (IC,N) @ dout (N,OC)
    kd_sgemm(CblasTrans, CblasNoTrans, IC, OC, N, 1.0f, inp, IC, dout, OC, 1.0f, dweight, OC);
    if (dbias)
        for (int n = 0; n < N; n++) {
            const float *row = dout + (size_t)n * OC;
            for (int o = 0; o < OC; o++) dbias[o] += row[o];
        }
}

void kd_conv1d_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, int N, int IC, int OC) {
    for (int n = 0; n < N; n++) {
        const float *dy = dout + (size_t)n * OC;
        for (int i = 0; dinp && i < IC; i++) {
            double acc = 0.0;
            for (int o = 0; o < OC; o++) acc += (double)dy[o] * weight[(size_t)i * OC + o];
            dinp[(size_t)n * IC + i] = (float)acc;
        }
    }
    for (int i = 0; i < IC; i++)
        for (int o = 0; o < OC; o++) {
            double acc = 0.0;
            for (int n = 0; n < N; n++)
                acc += (double)inp[(size_t)n * IC + i] * dout[(size_t)n * OC + o];
            dweight[(size_t)i * OC + o] += (float)acc;
        }
    for (int o = 0; dbias && o < OC; o++) {
        double acc = 0.0;
        for (int n = 0; n < N; n++) acc += dout[(size_t)n * OC + o];
        dbias[o] += (float)acc;
    }
}

/* ---- LayerNorm ---- */

/* sum of x[0..n) in LANES partial sums, added in a fixed order */
static inline float sum_lanes(const float *x, int n) {
    float lane[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) lane[j] += x[i + j];
    float s = 0.0f;
    for (; i < n; i++) s += x[i];
    for (int j = 0; j < LANES; j++) s += lane[j];
    return s;
}

#define LN_GRAIN 64 /* rows per thread, at least */

typedef struct {
    float *out, *mean, *rstd, *dinp, *dweight, *dbias;
    const float *inp, *dout, *weight, *bias, *mean_in, *rstd_in;
    size_t N;
    int C;
    float eps;
} ln_ctx_t;

KD_VECTOR_CLONES
static void layernorm_forward_rows(void *ctx_, size_t lo, size_t hi, int worker) {
    (void)worker;
    const ln_ctx_t *c = ctx_;
    const int C = c->C;
    for (size_t n = lo; n < hi; n++) {
        const float *x = c->inp + n * C;
        float *y = c->out + n * C;
        const float m = sum_lanes(x, C) / (float)C;
        /* two passes (x - m)^2: no cancellation */
        float lane[LANES] = {0}, v = 0.0f;
        int i = 0;
        for (; i + LANES <= C; i += LANES)
            for (int j = 0; j < LANES; j++) lane[j] += (x[i + j] - m) * (x[i + j] - m);
        for (; i < C; i++) v += (x[i] - m) * (x[i] - m);
        for (int j = 0; j < LANES; j++) v += lane[j];
        const float s = 1.0f / sqrtf(v / (float)C + c->eps);
        for (i = 0; i < C; i++) y[i] = (x[i] - m) * s * c->weight[i] + c->bias[i];
        c->mean[n] = m;
        c->rstd[n] = s;
    }
}

void kd_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                          const float *weight, const float *bias, int N, int C, float eps) {
    ln_ctx_t c = {.out = out,
                  .mean = mean,
                  .rstd = rstd,
                  .inp = inp,
                  .weight = weight,
                  .bias = bias,
                  .C = C,
                  .eps = eps};
    parallel_for(layernorm_forward_rows, &c, (size_t)N, LN_GRAIN, 0, false);
}

/* dx of rows [lo, hi); with `params`, also their dweight and dbias (one thread only: the
 * parameter sums run over rows) */
static inline void layernorm_backward_rows(const ln_ctx_t *c, size_t lo, size_t hi, bool params) {
    const int C = c->C;
    const float *weight = c->weight;
    for (size_t n = lo; n < hi; n++) {
        const float *dy = c->dout + n * C, *x = c->inp + n * C;
        float *dx = c->dinp + n * C;
        const float m = c->mean_in[n], s = c->rstd_in[n];
        /* dx = s * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dy * w */
        float la[LANES] = {0}, lb[LANES] = {0}, sa = 0.0f, sb = 0.0f;
        int i = 0;
        for (; i + LANES <= C; i += LANES)
            for (int j = 0; j < LANES; j++) {
                const float norm = (x[i + j] - m) * s, dnorm = weight[i + j] * dy[i + j];
                la[j] += dnorm;
                lb[j] += dnorm * norm;
            }
        for (; i < C; i++) {
            const float norm = (x[i] - m) * s, dnorm = weight[i] * dy[i];
            sa += dnorm;
            sb += dnorm * norm;
        }
        for (int j = 0; j < LANES; j++) sa += la[j], sb += lb[j];
        const float a = sa / (float)C, b = sb / (float)C;
        if (params)
            for (i = 0; i < C; i++) {
                const float norm = (x[i] - m) * s, dnorm = weight[i] * dy[i];
                c->dbias[i] += dy[i];
                c->dweight[i] += norm * dy[i];
                dx[i] += s * (dnorm - a - norm * b);
            }
        else
            for (i = 0; i < C; i++) {
                const float norm = (x[i] - m) * s, dnorm = weight[i] * dy[i];
                dx[i] += s * (dnorm - a - norm * b);
            }
    }
}

KD_VECTOR_CLONES
static void layernorm_backward_dx(void *ctx_, size_t lo, size_t hi, int worker) {
    (void)worker;
    layernorm_backward_rows(ctx_, lo, hi, false);
}

/* dweight and dbias of channels [lo, hi), summed over the rows in their order: the same sums
 * as the one-thread pass makes */
KD_VECTOR_CLONES
static void layernorm_backward_params(void *ctx_, size_t lo, size_t hi, int worker) {
    (void)worker;
    const ln_ctx_t *c = ctx_;
    const size_t C = (size_t)c->C;
    for (size_t n = 0; n < c->N; n++) {
        const float *dy = c->dout + n * C, *x = c->inp + n * C;
        const float m = c->mean_in[n], s = c->rstd_in[n];
        for (size_t i = lo; i < hi; i++) {
            c->dbias[i] += dy[i];
            c->dweight[i] += (x[i] - m) * s * dy[i];
        }
    }
}

KD_VECTOR_CLONES
static void layernorm_backward_all(void *ctx_, size_t lo, size_t hi, int worker) {
    (void)worker;
    layernorm_backward_rows(ctx_, lo, hi, true);
}

void kd_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                           const float *inp, const float *weight, const float *mean,
                           const float *rstd, int N, int C) {
    ln_ctx_t c = {.dinp = dinp,
                  .dweight = dweight,
                  .dbias = dbias,
                  .dout = dout,
                  .inp = inp,
                  .weight = weight,
                  .mean_in = mean,
                  .rstd_in = rstd,
                  .N = (size_t)N,
                  .C = C};
    if (region_threads((size_t)N, LN_GRAIN) > 1) {
        /* rows for dx, then channels for the parameter sums: no two threads add to one sum */
        parallel_for(layernorm_backward_dx, &c, (size_t)N, LN_GRAIN, 0, false);
        parallel_for(layernorm_backward_params, &c, (size_t)C, 8, 0, false);
    } else {
        layernorm_backward_all(&c, 0, (size_t)N, 0);
    }
}

/* ---- causal self-attention ---- */

/* The attention works on tiles of ATT_TILE rows (queries) [r0, r1): their scores need the
 * keys [0, r1) only, so the GEMMs skip every tile right of the diagonal one; for T = 256 that
 * is 5/8 of the full (T,T) products. 64 rows: OpenBLAS is as fast on a (64, r1, 32) product as
 * on the whole square, per flop, on the shapes of the GPT recipes (hs 32); smaller tiles lose
 * it to the per-call overhead. */
#define ATT_TILE 64

/* scores (n) to probabilities in place: shifted by the max, exp, normalised */
static inline void softmax_row(float *row, int n) {
    const float mx = max_f(row, n);
    float lane[LANES] = {0}, sum = 0.0f;
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            const float e = exp_poly(row[i + j] - mx);
            row[i + j] = e;
            lane[j] += e;
        }
    for (; i < n; i++) {
        row[i] = exp_poly(row[i] - mx);
        sum += row[i];
    }
    for (int j = 0; j < LANES; j++) sum += lane[j];
    const float inv = 1.0f / sum;
    for (i = 0; i < n; i++) row[i] *= inv;
}

/* softmax backward of one row: ds = p * (dp - sum_j p dp), in place over dp (n) */
static inline void softmax_backward_row(float *dp, const float *p, int n) {
    float lane[LANES] = {0}, dot = 0.0f;
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) lane[j] += p[i + j] * dp[i + j];
    for (; i < n; i++) dot += p[i] * dp[i];
    for (int j = 0; j < LANES; j++) dot += lane[j];
    for (i = 0; i < n; i++) dp[i] = p[i] * (dp[i] - dot);
}

typedef struct {
    float *out, *att, *dqkv, *scratch;
    const float *qkv, *dout, *att_in;
    int B, T, C, NH;
} att_ctx_t;

/* heads [lo, hi) of the (B, NH) heads */
KD_VECTOR_CLONES
static void attention_forward_heads(void *ctx_, size_t lo, size_t hi, int worker) {
    (void)worker;
    const att_ctx_t *c = ctx_;
    const int T = c->T, C = c->C, NH = c->NH, hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)hs);
    for (size_t bh = lo; bh < hi; bh++) {
        const size_t b = bh / (size_t)NH, h = bh % (size_t)NH;
        const float *q = c->qkv + b * T * C3 + h * hs, *k = q + C, *v = q + 2 * C;
        float *p = c->att + bh * T * T;
        float *o = c->out + b * T * C + h * hs;
        for (int r0 = 0; r0 < T; r0 += ATT_TILE) {
            const int r1 = r0 + ATT_TILE < T ? r0 + ATT_TILE : T, R = r1 - r0;
            float *pt = p + (size_t)r0 * T;
            // pt (R,r1) = q[r0:r1] (R,hs) @ k[0:r1]^T (hs,r1) * scale
            kd_sgemm(CblasNoTrans, CblasTrans, R, r1, hs, scale, q + (size_t)r0 * C3, C3, k, C3,
                     0.0f, pt, T);
            for (int t = r0; t < r1; t++) {
                float *row = p + (size_t)t * T;
                softmax_row(row, t + 1);
                memset(row + t + 1, 0, (size_t)(T - t - 1) * sizeof(float));
            }
            // out[b, r0:r1, h] (R,hs) = pt (R,r1) @ v[0:r1] (r1,hs)
            kd_sgemm(CblasNoTrans, CblasNoTrans, R, hs, r1, 1.0f, pt, T, v, C3, 0.0f,
                     o + (size_t)r0 * C, C);
        }
    }
}

void kd_attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH) {
    att_ctx_t c = {.out = out, .att = att, .qkv = qkv, .B = B, .T = T, .C = C, .NH = NH};
    parallel_for(attention_forward_heads, &c, (size_t)B * NH, 1, 0, true);
}

void kd_attention_forward_naive(float *out, float *att, const float *qkv, int B, int T, int C,
                                int NH) {
    const int hs = C / NH, C3 = 3 * C;
    const double scale = 1.0 / sqrt((double)hs);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                float *p = att + (((size_t)b * NH + h) * T + t) * T;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j < T; j++) {
                    const float *k = qkv + ((size_t)b * T + j) * C3 + C + h * hs;
                    double dot = 0.0;
                    for (int i = 0; i < hs; i++) dot += (double)q[i] * k[i];
                    p[j] = j <= t ? (float)(dot * scale) : 0.0f;
                    if (j <= t && p[j] > mx) mx = p[j];
                }
                for (int j = 0; j <= t; j++) sum += exp(p[j] - mx);
                for (int j = 0; j <= t; j++) p[j] = (float)(exp(p[j] - mx) / sum);
                float *o = out + ((size_t)b * T + t) * C + h * hs;
                for (int i = 0; i < hs; i++) {
                    double acc = 0.0;
                    for (int j = 0; j <= t; j++)
                        acc += (double)p[j] * qkv[((size_t)b * T + j) * C3 + 2 * C + h * hs + i];
                    o[i] = (float)acc;
                }
            }
}

/* Heads [lo, hi): a row tile [r0, r1) of queries at a time, as in the forward. Its dp, then
 * ds, live in the worker's (ATT_TILE, T) slice of the scratch; dq of the tile is final, and
 * the keys/values [0, r1) it sees get their part of dk and dv added. */
KD_VECTOR_CLONES
static void attention_backward_heads(void *ctx_, size_t lo, size_t hi, int worker) {
    const att_ctx_t *c = ctx_;
    const int T = c->T, C = c->C, NH = c->NH, hs = C / NH, C3 = 3 * C;
    const int tile = T < ATT_TILE ? T : ATT_TILE;
    const float scale = 1.0f / sqrtf((float)hs);
    float *ds = c->scratch + (size_t)worker * tile * T; /* (tile, T) */
    for (size_t bh = lo; bh < hi; bh++) {
        const size_t b = bh / (size_t)NH, h = bh % (size_t)NH;
        const size_t base = b * T * C3 + h * hs;
        const float *q = c->qkv + base, *k = q + C, *v = q + 2 * C;
        float *dq = c->dqkv + base, *dk = dq + C, *dv = dq + 2 * C;
        const float *p = c->att_in + bh * T * T;
        const float *dy = c->dout + b * T * C + h * hs;
        for (int t = 0; t < T; t++) { /* dk, dv are sums over the row tiles */
            memset(dk + (size_t)t * C3, 0, (size_t)hs * sizeof(float));
            memset(dv + (size_t)t * C3, 0, (size_t)hs * sizeof(float));
        }
        for (int r0 = 0; r0 < T; r0 += tile) {
            const int r1 = r0 + tile < T ? r0 + tile : T, R = r1 - r0;
            const float *pt = p + (size_t)r0 * T;
            // dp (R,r1) = dy[r0:r1] (R,hs) @ v[0:r1]^T (hs,r1)
            kd_sgemm(CblasNoTrans, CblasTrans, R, r1, hs, 1.0f, dy + (size_t)r0 * C, C, v, C3, 0.0f,
                     ds, T);
            // dv[0:r1] (r1,hs) += p[r0:r1, 0:r1]^T (r1,R) @ dy[r0:r1] (R,hs)
            kd_sgemm(CblasTrans, CblasNoTrans, r1, hs, R, 1.0f, pt, T, dy + (size_t)r0 * C, C, 1.0f,
                     dv, C3);
            /* softmax backward; zero above the diagonal (the GEMMs below read up to r1) */
            for (int t = r0; t < r1; t++) {
                float *dr = ds + (size_t)(t - r0) * T;
                softmax_backward_row(dr, p + (size_t)t * T, t + 1);
                memset(dr + t + 1, 0, (size_t)(r1 - t - 1) * sizeof(float));
            }
            // dq[r0:r1] (R,hs) = ds (R,r1) @ k[0:r1] (r1,hs) * scale
            kd_sgemm(CblasNoTrans, CblasNoTrans, R, hs, r1, scale, ds, T, k, C3, 0.0f,
                     dq + (size_t)r0 * C3, C3);
            // dk[0:r1] (r1,hs) += ds^T (r1,R) @ q[r0:r1] (R,hs) * scale
            kd_sgemm(CblasTrans, CblasNoTrans, r1, hs, R, scale, ds, T, q + (size_t)r0 * C3, C3,
                     1.0f, dk, C3);
        }
    }
}

void kd_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                           const float *att, int B, int T, int C, int NH) {
    att_ctx_t c = {.dqkv = dqkv,
                   .scratch = scratch,
                   .dout = dout,
                   .qkv = qkv,
                   .att_in = att,
                   .B = B,
                   .T = T,
                   .C = C,
                   .NH = NH};
    /* the scratch (T,T) holds T / tile slices of (tile, T): one per thread */
    const int tile = T < ATT_TILE ? T : ATT_TILE;
    parallel_for(attention_backward_heads, &c, (size_t)B * NH, 1, T / tile, true);
}

void kd_attention_backward_naive(float *dqkv, const float *dout, const float *qkv, const float *att,
                                 int B, int T, int C, int NH) {
    const int hs = C / NH, C3 = 3 * C;
    const double scale = 1.0 / sqrt((double)hs);
    memset(dqkv, 0, (size_t)B * T * C3 * sizeof(float));
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *p = att + (((size_t)b * NH + h) * T + t) * T;
                const float *dy = dout + ((size_t)b * T + t) * C + h * hs;
                const float *q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                float *dq = dqkv + ((size_t)b * T + t) * C3 + h * hs;
                double dp[T > 0 ? T : 1], dot = 0.0;
                for (int j = 0; j <= t; j++) {
                    const float *v = qkv + ((size_t)b * T + j) * C3 + 2 * C + h * hs;
                    float *dv = dqkv + ((size_t)b * T + j) * C3 + 2 * C + h * hs;
                    dp[j] = 0.0;
                    for (int i = 0; i < hs; i++) {
                        dp[j] += (double)dy[i] * v[i];
                        dv[i] += p[j] * dy[i];
                    }
                    dot += p[j] * dp[j];
                }
                for (int j = 0; j <= t; j++) {
                    double ds = p[j] * (dp[j] - dot) * scale;
                    const float *k = qkv + ((size_t)b * T + j) * C3 + C + h * hs;
                    float *dk = dqkv + ((size_t)b * T + j) * C3 + C + h * hs;
                    for (int i = 0; i < hs; i++) {
                        dq[i] += (float)(ds * k[i]);
                        dk[i] += (float)(ds * q[i]);
                    }
                }
            }
}

/* ---- softmax cross-entropy rows (the head's loss) ---- */

#define LSE_BLOCK 1024 /* float partial sums per block, the blocks' sums in double */

KD_VECTOR_CLONES
float kd_logsumexp(const float *x, int n, float *max) {
    const float mx = max_f(x, n);
    double total = 0.0;
    for (int b0 = 0; b0 < n; b0 += LSE_BLOCK) {
        const int b1 = b0 + LSE_BLOCK < n ? b0 + LSE_BLOCK : n;
        float lane[LANES] = {0}, sum = 0.0f;
        int i = b0;
        for (; i + LANES <= b1; i += LANES)
            for (int j = 0; j < LANES; j++) lane[j] += exp_poly(x[i + j] - mx);
        for (; i < b1; i++) sum += exp_poly(x[i] - mx);
        for (int j = 0; j < LANES; j++) sum += lane[j];
        total += sum;
    }
    if (max) *max = mx;
    return mx + (float)log(total);
}

KD_VECTOR_CLONES
void kd_exp_shift_scale(float *x, int n, float shift, float scale) {
    for (int i = 0; i < n; i++) x[i] = exp_poly(x[i] - shift) * scale;
}

/* ---- GELU, tanh approximation ---- */

#define GELU_SCALE 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_CUBIC 0.044715f

#define GELU_GRAIN 16384 /* elements per thread, at least */

typedef struct {
    float *out;
    const float *inp, *dout;
} gelu_ctx_t;

/* 0.5 (1 + tanh(u)) is the logistic function of 2u, so gelu(x) = x / (1 + e^(-2u)) with
 * u = sqrt(2/pi) (x + 0.044715 x^3): one exp_poly, no tanhf. */
KD_VECTOR_CLONES
static void gelu_forward_range(void *ctx_, size_t lo, size_t hi, int worker) {
    (void)worker;
    const gelu_ctx_t *c = ctx_;
    float *out = c->out;
    const float *inp = c->inp;
    for (size_t i = lo; i < hi; i++) {
        const float x = inp[i];
        const float e = exp_poly(-2.0f * GELU_SCALE * x * (1.0f + GELU_CUBIC * x * x));
        out[i] = x / (1.0f + e);
    }
}

void kd_gelu_tanh_forward(float *out, const float *inp, size_t n) {
    gelu_ctx_t c = {.out = out, .inp = inp};
    parallel_for(gelu_forward_range, &c, n, GELU_GRAIN, 0, false);
}

/* With s = 1 / (1 + e), e = e^(-2u): gelu' = s + x sech^2(u) u' / 2 = s + 2 x u' (1 - s) s
 * (sech^2(u) = 4 s (1 - s)), and 1 - s = e s has no cancellation where s is near 1. */
KD_VECTOR_CLONES
static void gelu_backward_range(void *ctx_, size_t lo, size_t hi, int worker) {
    (void)worker;
    const gelu_ctx_t *c = ctx_;
    float *dinp = c->out;
    const float *inp = c->inp, *dout = c->dout;
    for (size_t i = lo; i < hi; i++) {
        const float x = inp[i];
        const float e = exp_poly(-2.0f * GELU_SCALE * x * (1.0f + GELU_CUBIC * x * x));
        /* es = 1 - s, in [0, 1]: (x u' e) s s would overflow for x below about -10 */
        const float s = 1.0f / (1.0f + e), es = e * s;
        const float du = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x * x);
        dinp[i] = dout[i] * (s + 2.0f * x * du * es * s);
    }
}

void kd_gelu_tanh_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    gelu_ctx_t c = {.out = dinp, .inp = inp, .dout = dout};
    parallel_for(gelu_backward_range, &c, n, GELU_GRAIN, 0, false);
}
