/* kd_kernels_gpt: the transformer kernels of GPT-2 (see kd_kernels.h), each fast version on
 * OpenBLAS with a naive reference loop beside it for the tests, after llm.c's train_gpt2.c.
 * Shapes in the comments: N rows (B*T), C channels, NH heads of hs = C/NH, OC/IC out/in. */
#include <math.h>
#include <string.h>

#include "kd_kernels.h"
#include "kd_util.h"

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

void kd_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                          const float *weight, const float *bias, int N, int C, float eps) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        double m = 0.0, v = 0.0;
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        for (int i = 0; i < C; i++) v += ((double)x[i] - m) * ((double)x[i] - m);
        v /= C;
        float s = (float)(1.0 / sqrt(v + eps)), mf = (float)m;
        for (int i = 0; i < C; i++) y[i] = (x[i] - mf) * s * weight[i] + bias[i];
        mean[n] = mf;
        rstd[n] = s;
    }
}

void kd_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                           const float *inp, const float *weight, const float *mean,
                           const float *rstd, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float *dy = dout + (size_t)n * C, *x = inp + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        const float m = mean[n], s = rstd[n];
        /* dx = s * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dy * w */
        double dnorm_mean = 0.0, dnorm_norm_mean = 0.0;
        for (int i = 0; i < C; i++) {
            float norm = (x[i] - m) * s, dnorm = weight[i] * dy[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += (double)dnorm * norm;
        }
        const float a = (float)(dnorm_mean / C), b = (float)(dnorm_norm_mean / C);
        for (int i = 0; i < C; i++) {
            float norm = (x[i] - m) * s, dnorm = weight[i] * dy[i];
            dbias[i] += dy[i];
            dweight[i] += norm * dy[i];
            dx[i] += s * (dnorm - a - norm * b);
        }
    }
}

/* ---- causal self-attention ---- */

/* Row t of the scores (t+1 entries, the rest of the row is left as it is) to probabilities. */
static void causal_softmax_row(float *row, int t) {
    float mx = -INFINITY;
    for (int j = 0; j <= t; j++) mx = row[j] > mx ? row[j] : mx;
    double sum = 0.0;
    for (int j = 0; j <= t; j++) {
        row[j] = expf(row[j] - mx);
        sum += row[j];
    }
    const float inv = (float)(1.0 / sum);
    for (int j = 0; j <= t; j++) row[j] *= inv;
}

void kd_attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH) {
    const int hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)hs);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const float *q = qkv + (size_t)b * T * C3 + h * hs, *k = q + C, *v = q + 2 * C;
            float *p = att + ((size_t)b * NH + h) * T * T;
            // p (T,T) = q (T,hs) @ k^T (hs,T) * scale; only the lower triangle is used
            kd_sgemm(CblasNoTrans, CblasTrans, T, T, hs, scale, q, C3, k, C3, 0.0f, p, T);
            for (int t = 0; t < T; t++) {
                float *row = p + (size_t)t * T;
                causal_softmax_row(row, t);
                memset(row + t + 1, 0, (size_t)(T - t - 1) * sizeof(float));
            }
            // out[b, :, h] (T,hs) = p (T,T) @ v (T,hs)
            kd_sgemm(CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, p, T, v, C3, 0.0f,
                     out + (size_t)b * T * C + h * hs, C);
        }
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

void kd_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                           const float *att, int B, int T, int C, int NH) {
    const int hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / sqrtf((float)hs);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const size_t base = (size_t)b * T * C3 + (size_t)h * hs;
            const float *q = qkv + base, *k = q + C, *v = q + 2 * C;
            float *dq = dqkv + base, *dk = dq + C, *dv = dq + 2 * C;
            const float *p = att + ((size_t)b * NH + h) * T * T;
            const float *dy = dout + (size_t)b * T * C + h * hs;
            float *ds = scratch;
            // dp (T,T) = dy (T,hs) @ v^T (hs,T)
            kd_sgemm(CblasNoTrans, CblasTrans, T, T, hs, 1.0f, dy, C, v, C3, 0.0f, ds, T);
            // dv (T,hs) = p^T (T,T) @ dy (T,hs)
            kd_sgemm(CblasTrans, CblasNoTrans, T, hs, T, 1.0f, p, T, dy, C, 0.0f, dv, C3);
            /* softmax backward: ds = p * (dp - sum_j p dp); zero above the diagonal (p is) */
            for (int t = 0; t < T; t++) {
                const float *pr = p + (size_t)t * T;
                float *dr = ds + (size_t)t * T;
                double dot = 0.0;
                for (int j = 0; j <= t; j++) dot += (double)pr[j] * dr[j];
                for (int j = 0; j <= t; j++) dr[j] = pr[j] * (dr[j] - (float)dot);
                memset(dr + t + 1, 0, (size_t)(T - t - 1) * sizeof(float));
            }
            // dq (T,hs) = ds (T,T) @ k (T,hs) * scale;  dk (T,hs) = ds^T @ q * scale
            kd_sgemm(CblasNoTrans, CblasNoTrans, T, hs, T, scale, ds, T, k, C3, 0.0f, dq, C3);
            kd_sgemm(CblasTrans, CblasNoTrans, T, hs, T, scale, ds, T, q, C3, 0.0f, dk, C3);
        }
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

/* ---- GELU, tanh approximation ---- */

#define GELU_SCALE 0.7978845608028654f /* sqrt(2/pi) */

void kd_gelu_tanh_forward(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
    }
}

void kd_gelu_tanh_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float x = inp[i], u = GELU_SCALE * (x + 0.044715f * x * x * x);
        float th = tanhf(u), sech2 = 1.0f - th * th;
        float du = GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = dout[i] * (0.5f * (1.0f + th) + 0.5f * x * sech2 * du);
    }
}
