/* kd_kernels: layer kernels on OpenBLAS, with naive references (see kd_kernels.h).
 * The fast kernels do no allocation: conv2d scratch comes from the caller's workspace. */
#include "kd_kernels.h"

#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "kd_rng.h"
#include "kd_util.h"

/* ---- sgemm wrapper and trace ---- */

static _Thread_local kd_sgemm_call_t *trace_buf;
static _Thread_local int trace_cap, trace_count;
static _Thread_local bool trace_on;

void kd_sgemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, float alpha,
              const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (trace_on) {
        if (trace_count < trace_cap)
            trace_buf[trace_count] = (kd_sgemm_call_t){.ta = ta, .tb = tb, .M = M, .N = N, .K = K};
        trace_count++;
    }
    cblas_sgemm(CblasRowMajor, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void kd_sgemm_trace_begin(kd_sgemm_call_t *buf, int cap) {
    trace_buf = buf;
    trace_cap = buf ? cap : 0;
    trace_count = 0;
    trace_on = true;
}

int kd_sgemm_trace_end(void) {
    trace_on = false;
    trace_buf = NULL;
    trace_cap = 0;
    return trace_count;
}

/* ---- linear ---- */

void kd_linear_forward(float *out, const float *inp, const float *weight, const float *bias, int B,
                       int IC, int OC) {
    /* Seeding out with the bias and using beta = 1 folds the bias add into the GEMM's pass. */
    if (bias)
        for (int b = 0; b < B; b++) memcpy(out + (size_t)b * OC, bias, (size_t)OC * sizeof(float));
    kd_sgemm(CblasNoTrans, CblasTrans, B, OC, IC, 1.0f, inp, IC, weight, IC, bias ? 1.0f : 0.0f,
             out, OC);
}

void kd_linear_forward_naive(float *out, const float *inp, const float *weight, const float *bias,
                             int B, int IC, int OC) {
    for (int b = 0; b < B; b++)
        for (int o = 0; o < OC; o++) {
            double acc = bias ? bias[o] : 0.0;
            for (int i = 0; i < IC; i++)
                acc += (double)inp[(size_t)b * IC + i] * weight[(size_t)o * IC + i];
            out[(size_t)b * OC + o] = (float)acc;
        }
}

void kd_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, int B, int IC, int OC) {
    // dinp (B,IC) = dout (B,OC) @ weight (OC,IC)
    if (dinp)
        kd_sgemm(CblasNoTrans, CblasNoTrans, B, IC, OC, 1.0f, dout, OC, weight, IC, 0.0f, dinp, IC);
    // dweight (OC,IC) = dout^T (OC,B) @ inp (B,IC)
    kd_sgemm(CblasTrans, CblasNoTrans, OC, IC, B, 1.0f, dout, OC, inp, IC, 0.0f, dweight, IC);
    if (dbias) {
        memset(dbias, 0, (size_t)OC * sizeof(float));
        for (int b = 0; b < B; b++) {
            const float *row = dout + (size_t)b * OC;
            for (int o = 0; o < OC; o++) dbias[o] += row[o];
        }
    }
}

void kd_linear_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, int B, int IC, int OC) {
    if (dinp)
        for (int b = 0; b < B; b++)
            for (int i = 0; i < IC; i++) {
                double acc = 0.0;
                for (int o = 0; o < OC; o++)
                    acc += (double)dout[(size_t)b * OC + o] * weight[(size_t)o * IC + i];
                dinp[(size_t)b * IC + i] = (float)acc;
            }
    for (int o = 0; o < OC; o++)
        for (int i = 0; i < IC; i++) {
            double acc = 0.0;
            for (int b = 0; b < B; b++)
                acc += (double)dout[(size_t)b * OC + o] * inp[(size_t)b * IC + i];
            dweight[(size_t)o * IC + i] = (float)acc;
        }
    if (dbias)
        for (int o = 0; o < OC; o++) {
            double acc = 0.0;
            for (int b = 0; b < B; b++) acc += dout[(size_t)b * OC + o];
            dbias[o] = (float)acc;
        }
}

/* ---- conv2d ---- */

kd_conv2d_t kd_conv2d_make(int B, int C, int H, int W, int OC, int KH, int KW, int stride,
                           int pad) {
    KD_ASSERT(stride >= 1 && pad >= 0 && KH >= 1 && KW >= 1);
    KD_ASSERT(H + 2 * pad >= KH && W + 2 * pad >= KW);
    kd_conv2d_t d = {
        .B = B, .C = C, .H = H, .W = W, .OC = OC, .KH = KH, .KW = KW, .stride = stride, .pad = pad};
    d.OH = (H + 2 * pad - KH) / stride + 1;
    d.OW = (W + 2 * pad - KW) / stride + 1;
    return d;
}

int kd_conv2d_default_group(const kd_conv2d_t *d) {
    /* Per-image GEMMs keep the im2col matrix in cache. Measured on the teacher CNN at B=128
     * (2 cores): groups of 1, 4 and 16 images were within noise of each other, a whole-batch
     * GEMM about 25% slower (its 29 MB im2col matrix streams through memory). */
    (void)d;
    return 1;
}

size_t kd_conv2d_scratch_floats(const kd_conv2d_t *d, int group) {
    size_t P = (size_t)d->OH * d->OW;
    size_t ckk = (size_t)d->C * d->KH * d->KW;
    size_t n = ckk * group * P;
    if (group > 1) n += (size_t)d->OC * group * P; /* GEMM result before the NCHW reorder */
    return n;
}

/* Output columns [lo, hi) of a row whose input column iw = ow*s + iw0 lies inside [0, W). */
static inline void valid_cols(int iw0, int s, int W, int OW, int *lo, int *hi) {
    int l = iw0 >= 0 ? 0 : (-iw0 + s - 1) / s;
    int h = W - iw0 <= 0 ? 0 : (W - iw0 + s - 1) / s;
    if (h > OW) h = OW;
    if (l > h) l = h;
    *lo = l;
    *hi = h;
}

/* Copy (or add) one output row of im2col: dst[ow] = src[ow * s] for ow in [lo, hi), zeros
 * outside. Inline loops, not memcpy: rows are short (OW = 14 in the CNN). */
static inline void im2col_row(float *restrict dst, const float *restrict src, int s, int lo, int hi,
                              int OW) {
    for (int ow = 0; ow < lo; ow++) dst[ow] = 0.0f;
    if (s == 1)
        for (int ow = lo; ow < hi; ow++) dst[ow] = src[ow];
    else
        for (int ow = lo; ow < hi; ow++) dst[ow] = src[ow * s];
    for (int ow = hi; ow < OW; ow++) dst[ow] = 0.0f;
}

void kd_im2col(float *col, const float *inp, const kd_conv2d_t *d, int b0, int G) {
    const int s = d->stride, OH = d->OH, OW = d->OW, H = d->H, W = d->W;
    const size_t P = (size_t)OH * OW, row_len = (size_t)G * P;
    for (int c = 0; c < d->C; c++)
        for (int kh = 0; kh < d->KH; kh++) {
            /* output rows whose input row ih = oh*s - pad + kh is inside [0, H) */
            int oh_lo, oh_hi;
            valid_cols(kh - d->pad, s, H, OH, &oh_lo, &oh_hi);
            for (int kw = 0; kw < d->KW; kw++) {
                float *row = col + ((size_t)(c * d->KH + kh) * d->KW + kw) * row_len;
                int iw0 = kw - d->pad, lo, hi;
                valid_cols(iw0, s, W, OW, &lo, &hi);
                for (int j = 0; j < G; j++) {
                    const float *img = inp + ((size_t)(b0 + j) * d->C + c) * H * W;
                    float *dst = row + j * P;
                    for (int i = 0; i < oh_lo * OW; i++) dst[i] = 0.0f;
                    for (int oh = oh_lo; oh < oh_hi; oh++) {
                        const float *src = img + (size_t)(oh * s - d->pad + kh) * W + iw0;
                        im2col_row(dst + (size_t)oh * OW, src, s, lo, hi, OW);
                    }
                    for (size_t i = (size_t)oh_hi * OW; i < P; i++) dst[i] = 0.0f;
                }
            }
        }
}

void kd_col2im(float *dinp, const float *col, const kd_conv2d_t *d, int b0, int G) {
    const int s = d->stride, OH = d->OH, OW = d->OW, H = d->H, W = d->W;
    const size_t P = (size_t)OH * OW, row_len = (size_t)G * P;
    for (int c = 0; c < d->C; c++)
        for (int kh = 0; kh < d->KH; kh++) {
            int oh_lo, oh_hi;
            valid_cols(kh - d->pad, s, H, OH, &oh_lo, &oh_hi);
            for (int kw = 0; kw < d->KW; kw++) {
                const float *row = col + ((size_t)(c * d->KH + kh) * d->KW + kw) * row_len;
                int iw0 = kw - d->pad, lo, hi;
                valid_cols(iw0, s, W, OW, &lo, &hi);
                for (int j = 0; j < G; j++) {
                    float *img = dinp + ((size_t)(b0 + j) * d->C + c) * H * W;
                    const float *src = row + j * P;
                    for (int oh = oh_lo; oh < oh_hi; oh++) {
                        float *restrict dst = img + (size_t)(oh * s - d->pad + kh) * W + iw0;
                        const float *restrict sr = src + (size_t)oh * OW;
                        if (s == 1)
                            for (int ow = lo; ow < hi; ow++) dst[ow] += sr[ow];
                        else
                            for (int ow = lo; ow < hi; ow++) dst[ow * s] += sr[ow];
                    }
                }
            }
        }
}

/* Sum of n floats with independent partial sums, so it vectorises without -ffast-math. */
static inline float sum_floats(const float *x, size_t n) {
    float acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += x[i + k];
    float t = 0.0f;
    for (; i < n; i++) t += x[i];
    return t + ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

void kd_conv2d_forward(float *out, const float *inp, const float *weight, const float *bias,
                       const kd_conv2d_t *d, int group, float *scratch) {
    const int OC = d->OC, ckk = d->C * d->KH * d->KW;
    const size_t P = (size_t)d->OH * d->OW;
    if (group < 1) group = 1;
    if (group > d->B) group = d->B;
    float *col = scratch;                           // (ckk, g*P)
    float *tmp = scratch + (size_t)ckk * group * P; // (OC, g*P), only when g > 1
    for (int b0 = 0; b0 < d->B; b0 += group) {
        int g = d->B - b0 < group ? d->B - b0 : group;
        kd_im2col(col, inp, d, b0, g);
        if (g == 1) {
            // out_b (OC,P) = weight (OC,ckk) @ col (ckk,P), seeded with the bias
            float *ob = out + (size_t)b0 * OC * P;
            if (bias)
                for (int oc = 0; oc < OC; oc++)
                    for (size_t p = 0; p < P; p++) ob[oc * P + p] = bias[oc];
            kd_sgemm(CblasNoTrans, CblasNoTrans, OC, (int)P, ckk, 1.0f, weight, ckk, col, (int)P,
                     bias ? 1.0f : 0.0f, ob, (int)P);
            continue;
        }
        const int n = (int)(g * P);
        kd_sgemm(CblasNoTrans, CblasNoTrans, OC, n, ckk, 1.0f, weight, ckk, col, n, 0.0f, tmp, n);
        // (OC, g, P) -> (g, OC, P), adding the bias on the way
        for (int j = 0; j < g; j++)
            for (int oc = 0; oc < OC; oc++) {
                const float *src = tmp + (size_t)oc * n + j * P;
                float *dst = out + ((size_t)(b0 + j) * OC + oc) * P;
                float bv = bias ? bias[oc] : 0.0f;
                for (size_t p = 0; p < P; p++) dst[p] = src[p] + bv;
            }
    }
}

void kd_conv2d_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, const kd_conv2d_t *d, int group,
                        float *scratch) {
    const int OC = d->OC, ckk = d->C * d->KH * d->KW;
    const size_t P = (size_t)d->OH * d->OW;
    const size_t img_in = (size_t)d->C * d->H * d->W;
    if (group < 1) group = 1;
    if (group > d->B) group = d->B;
    float *col = scratch;                           // (ckk, g*P): im2col, then dcol
    float *tmp = scratch + (size_t)ckk * group * P; // (OC, g*P): dout reordered
    if (dbias) memset(dbias, 0, (size_t)OC * sizeof(float));
    for (int b0 = 0; b0 < d->B; b0 += group) {
        int g = d->B - b0 < group ? d->B - b0 : group;
        const int n = (int)(g * P);
        const float *dg = dout + (size_t)b0 * OC * P;
        if (dbias)
            for (int j = 0; j < g; j++)
                for (int oc = 0; oc < OC; oc++) {
                    dbias[oc] += sum_floats(dg + ((size_t)j * OC + oc) * P, P);
                }
        const float *dT = dg; // (OC, g*P)
        if (g > 1) {
            for (int j = 0; j < g; j++)
                for (int oc = 0; oc < OC; oc++)
                    memcpy(tmp + (size_t)oc * n + j * P, dg + ((size_t)j * OC + oc) * P,
                           P * sizeof(float));
            dT = tmp;
        }
        kd_im2col(col, inp, d, b0, g);
        // dweight (OC,ckk) += dT (OC,n) @ col^T (n,ckk)
        kd_sgemm(CblasNoTrans, CblasTrans, OC, ckk, n, 1.0f, dT, n, col, n, b0 == 0 ? 0.0f : 1.0f,
                 dweight, ckk);
        if (dinp) {
            // dcol (ckk,n) = weight^T (ckk,OC) @ dT (OC,n); col is free to hold it now
            kd_sgemm(CblasTrans, CblasNoTrans, ckk, n, OC, 1.0f, weight, ckk, dT, n, 0.0f, col, n);
            memset(dinp + (size_t)b0 * img_in, 0, (size_t)g * img_in * sizeof(float));
            kd_col2im(dinp, col, d, b0, g);
        }
    }
}

void kd_conv2d_forward_naive(float *out, const float *inp, const float *weight, const float *bias,
                             const kd_conv2d_t *d) {
    for (int b = 0; b < d->B; b++)
        for (int oc = 0; oc < d->OC; oc++)
            for (int oh = 0; oh < d->OH; oh++)
                for (int ow = 0; ow < d->OW; ow++) {
                    double acc = bias ? bias[oc] : 0.0;
                    for (int c = 0; c < d->C; c++)
                        for (int kh = 0; kh < d->KH; kh++)
                            for (int kw = 0; kw < d->KW; kw++) {
                                int ih = oh * d->stride - d->pad + kh;
                                int iw = ow * d->stride - d->pad + kw;
                                if (ih < 0 || ih >= d->H || iw < 0 || iw >= d->W) continue;
                                acc += (double)weight[((oc * d->C + c) * d->KH + kh) * d->KW + kw] *
                                       inp[(((size_t)b * d->C + c) * d->H + ih) * d->W + iw];
                            }
                    out[(((size_t)b * d->OC + oc) * d->OH + oh) * d->OW + ow] = (float)acc;
                }
}

void kd_conv2d_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, const kd_conv2d_t *d) {
    size_t nin = (size_t)d->B * d->C * d->H * d->W;
    size_t nw = (size_t)d->OC * d->C * d->KH * d->KW;
    if (dinp) memset(dinp, 0, nin * sizeof(float));
    memset(dweight, 0, nw * sizeof(float));
    if (dbias) memset(dbias, 0, (size_t)d->OC * sizeof(float));
    for (int b = 0; b < d->B; b++)
        for (int oc = 0; oc < d->OC; oc++)
            for (int oh = 0; oh < d->OH; oh++)
                for (int ow = 0; ow < d->OW; ow++) {
                    float g = dout[(((size_t)b * d->OC + oc) * d->OH + oh) * d->OW + ow];
                    if (dbias) dbias[oc] += g;
                    for (int c = 0; c < d->C; c++)
                        for (int kh = 0; kh < d->KH; kh++)
                            for (int kw = 0; kw < d->KW; kw++) {
                                int ih = oh * d->stride - d->pad + kh;
                                int iw = ow * d->stride - d->pad + kw;
                                if (ih < 0 || ih >= d->H || iw < 0 || iw >= d->W) continue;
                                size_t wi = ((size_t)(oc * d->C + c) * d->KH + kh) * d->KW + kw;
                                size_t ii = (((size_t)b * d->C + c) * d->H + ih) * d->W + iw;
                                dweight[wi] += g * inp[ii];
                                if (dinp) dinp[ii] += g * weight[wi];
                            }
                }
}

/* ---- maxpool2d ---- */

/* PyTorch's rule: the first maximum in scan order wins, and a NaN wins. */
/* PyTorch's rule: the first maximum in scan order wins, and a NaN wins. Written as selects,
 * not branches: on real activations the comparisons are unpredictable. */
#define MAXPOOL_TAKE(v, i)                                                                         \
    do {                                                                                           \
        float v_ = (v);                                                                            \
        int take_ = (v_ > best) | (v_ != v_);                                                      \
        best = take_ ? v_ : best;                                                                  \
        best_i = take_ ? (i) : best_i;                                                             \
    } while (0)

void kd_maxpool2d_forward(float *out, int32_t *idx, const float *inp, int BC, int H, int W, int k,
                          int s) {
    const int OH = (H - k) / s + 1, OW = (W - k) / s + 1;
    for (int bc = 0; bc < BC; bc++) {
        const float *plane = inp + (size_t)bc * H * W;
        float *o = out + (size_t)bc * OH * OW;
        int32_t *ix = idx + (size_t)bc * OH * OW;
        for (int oh = 0; oh < OH; oh++) {
            const int ih0 = oh * s;
            if (k == 2 && s == 2) { /* the common case, without the inner loops */
                const float *r0 = plane + (size_t)ih0 * W, *r1 = r0 + W;
                for (int ow = 0; ow < OW; ow++) {
                    const int iw = 2 * ow, i0 = ih0 * W + iw;
                    float best = r0[iw];
                    int best_i = i0;
                    MAXPOOL_TAKE(r0[iw + 1], i0 + 1);
                    MAXPOOL_TAKE(r1[iw], i0 + W);
                    MAXPOOL_TAKE(r1[iw + 1], i0 + W + 1);
                    o[oh * OW + ow] = best;
                    ix[oh * OW + ow] = best_i;
                }
                continue;
            }
            for (int ow = 0; ow < OW; ow++) {
                const int iw0 = ow * s;
                int best_i = ih0 * W + iw0;
                float best = -INFINITY;
                for (int kh = 0; kh < k; kh++) {
                    const float *r = plane + (size_t)(ih0 + kh) * W + iw0;
                    for (int kw = 0; kw < k; kw++) MAXPOOL_TAKE(r[kw], (ih0 + kh) * W + iw0 + kw);
                }
                o[oh * OW + ow] = best;
                ix[oh * OW + ow] = best_i;
            }
        }
    }
}

void kd_maxpool2d_backward(float *dinp, const float *dout, const int32_t *idx, int BC, int H, int W,
                           int OH, int OW) {
    memset(dinp, 0, (size_t)BC * H * W * sizeof(float));
    const size_t P = (size_t)OH * OW;
    for (int bc = 0; bc < BC; bc++) {
        float *plane = dinp + (size_t)bc * H * W;
        const float *g = dout + bc * P;
        const int32_t *ix = idx + bc * P;
        for (size_t p = 0; p < P; p++) plane[ix[p]] += g[p];
    }
}

/* ---- elementwise ---- */

void kd_relu_forward(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
}

void kd_relu_backward(float *dinp, const float *dout, const float *out, size_t n) {
    for (size_t i = 0; i < n; i++) dinp[i] = out[i] > 0.0f ? dout[i] : 0.0f;
}

void kd_gelu_forward(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + erff(x * (float)M_SQRT1_2));
    }
}

void kd_gelu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    const float inv_sqrt_2pi = 0.3989422804014327f;
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float cdf = 0.5f * (1.0f + erff(x * (float)M_SQRT1_2));
        float pdf = inv_sqrt_2pi * expf(-0.5f * x * x);
        dinp[i] = dout[i] * (cdf + x * pdf);
    }
}

void kd_dropout_forward(float *out, float *mask, const float *inp, size_t n, float p,
                        uint64_t key) {
    KD_ASSERT(p >= 0.0f && p < 1.0f);
    const float scale = 1.0f / (1.0f - p);
    kd_rng_t rng;
    kd_rng_init(&rng, key);
    for (size_t i = 0; i < n; i++) {
        mask[i] = kd_rng_uniform(&rng) >= p ? scale : 0.0f;
        out[i] = inp[i] * mask[i];
    }
}

void kd_dropout_backward(float *dinp, const float *dout, const float *mask, size_t n) {
    for (size_t i = 0; i < n; i++) dinp[i] = dout[i] * mask[i];
}
