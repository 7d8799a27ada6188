/* kd_kernels: the compute kernels behind kd_model's layers (PyTorch semantics, NCHW), each
 * fast version with a naive reference loop beside it for the tests (llm.c style). Kernels own
 * nothing: callers pass outputs and scratch. Thread-safe; the sgemm trace is per thread. */
#ifndef KD_KERNELS_H
#define KD_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <cblas.h>

/* ---- the one sgemm entry point (row-major) ---- */

/* One recorded sgemm call: C (M,N) = op(A) (M,K) * op(B) (K,N). */
typedef struct {
    CBLAS_TRANSPOSE ta, tb;
    int M, N, K;
} kd_sgemm_call_t;

/* Every GEMM in kdist goes through here, so its shapes can be traced. Row-major. */
void kd_sgemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, float alpha,
              const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
/* Records the shapes of this thread's kd_sgemm calls into buf (calls past cap are counted but
 * not stored) until kd_sgemm_trace_end, which returns the number of calls made. */
void kd_sgemm_trace_begin(kd_sgemm_call_t *buf, int cap);
int kd_sgemm_trace_end(void);

/* ---- linear: y = x W^T + b ---- */

// out (B,OC), inp (B,IC), weight (OC,IC), bias (OC) or NULL
void kd_linear_forward(float *out, const float *inp, const float *weight, const float *bias, int B,
                       int IC, int OC);
void kd_linear_forward_naive(float *out, const float *inp, const float *weight, const float *bias,
                             int B, int IC, int OC);
// dinp (B,IC) or NULL to skip, dweight (OC,IC), dbias (OC) or NULL; all overwritten
void kd_linear_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, int B, int IC, int OC);
void kd_linear_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, int B, int IC, int OC);

/* ---- conv2d: cross-correlation, zero padding, NCHW, weight (OC,C,KH,KW) ---- */

typedef struct {
    int B, C, H, W; /* input */
    int OC, KH, KW, stride, pad;
    int OH, OW; /* output: (H + 2 pad - KH) / stride + 1 */
} kd_conv2d_t;

kd_conv2d_t kd_conv2d_make(int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad);
/* Images per GEMM: im2col of `group` images into one (C*KH*KW, group*OH*OW) matrix. */
int kd_conv2d_default_group(const kd_conv2d_t *d);
/* Floats of scratch the fast kernels need for a given group. */
size_t kd_conv2d_scratch_floats(const kd_conv2d_t *d, int group);

// out (B,OC,OH,OW), inp (B,C,H,W), weight (OC,C,KH,KW), bias (OC) or NULL
void kd_conv2d_forward(float *out, const float *inp, const float *weight, const float *bias,
                       const kd_conv2d_t *d, int group, float *scratch);
void kd_conv2d_forward_naive(float *out, const float *inp, const float *weight, const float *bias,
                             const kd_conv2d_t *d);
// dinp (B,C,H,W) or NULL to skip, dweight (OC,C,KH,KW), dbias (OC) or NULL; all overwritten
void kd_conv2d_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, const kd_conv2d_t *d, int group,
                        float *scratch);
void kd_conv2d_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, const kd_conv2d_t *d);

/* im2col of images [b0, b0+G): col (C*KH*KW, G*OH*OW); col2im adds back into dinp images. */
void kd_im2col(float *col, const float *inp, const kd_conv2d_t *d, int b0, int G);
void kd_col2im(float *dinp, const float *col, const kd_conv2d_t *d, int b0, int G);

/* ---- maxpool2d: no padding, floor mode; idx holds the argmax (ih*W+iw) in its plane ---- */

// out (BC,OH,OW), idx (BC,OH,OW), inp (BC,H,W); OH = (H - k) / s + 1
void kd_maxpool2d_forward(float *out, int32_t *idx, const float *inp, int BC, int H, int W, int k,
                          int s);
// dinp (BC,H,W) overwritten, dout (BC,OH,OW)
void kd_maxpool2d_backward(float *dinp, const float *dout, const int32_t *idx, int BC, int H, int W,
                           int OH, int OW);

/* ---- elementwise (n floats) ---- */

void kd_relu_forward(float *out, const float *inp, size_t n);
void kd_relu_backward(float *dinp, const float *dout, const float *out, size_t n);
/* Exact GELU: x * Phi(x), as torch.nn.GELU() */
void kd_gelu_forward(float *out, const float *inp, size_t n);
void kd_gelu_backward(float *dinp, const float *dout, const float *inp, size_t n);
/* Inverted dropout: mask[i] = 0 or 1/(1-p), drawn from kd_rng keyed by key alone. */
void kd_dropout_forward(float *out, float *mask, const float *inp, size_t n, float p, uint64_t key);
void kd_dropout_backward(float *dinp, const float *dout, const float *mask, size_t n);

/* ---- transformer kernels (GPT-2, kd_gpt; kd_kernels_gpt.c). N = rows (B*T). ---- */

/* Conv1D as Hugging Face's GPT-2 has it: y = x W + b with W stored [in, out]. */
// out (N,OC), inp (N,IC), weight (IC,OC), bias (OC) or NULL
void kd_conv1d_forward(float *out, const float *inp, const float *weight, const float *bias, int N,
                       int IC, int OC);
void kd_conv1d_forward_naive(float *out, const float *inp, const float *weight, const float *bias,
                             int N, int IC, int OC);
// dinp (N,IC) overwritten (NULL to skip); dweight (IC,OC), dbias (OC) or NULL: accumulated
void kd_conv1d_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, int N, int IC, int OC);
void kd_conv1d_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                              const float *inp, const float *weight, int N, int IC, int OC);

/* LayerNorm over the last dimension, biased variance, eps as GPT-2 (1e-5). */
// out (N,C), mean (N), rstd (N), inp (N,C), weight (C), bias (C)
void kd_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                          const float *weight, const float *bias, int N, int C, float eps);
// dinp (N,C), dweight (C), dbias (C): all accumulated
void kd_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                           const float *inp, const float *weight, const float *mean,
                           const float *rstd, int N, int C);

/* Causal multi-head self-attention on the fused qkv of c_attn. Head h of sample b reads
 * q = qkv[b, :, h*hs:(h+1)*hs], k at +C, v at +2C; hs = C / NH; scores scaled by 1/sqrt(hs),
 * position t attends to 0..t, softmax shifted by the row max. */
// out (B,T,C), att (B,NH,T,T) the probabilities (0 above the diagonal), qkv (B,T,3C)
void kd_attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH);
void kd_attention_forward_naive(float *out, float *att, const float *qkv, int B, int T, int C,
                                int NH);
// dqkv (B,T,3C) overwritten; dout (B,T,C); scratch (T,T)
void kd_attention_backward(float *dqkv, float *scratch, const float *dout, const float *qkv,
                           const float *att, int B, int T, int C, int NH);
void kd_attention_backward_naive(float *dqkv, const float *dout, const float *qkv, const float *att,
                                 int B, int T, int C, int NH);

/* Softmax cross-entropy of the head (kd_gpt_loss), one row of logits at a time. */
// x (n): log(sum_j e^x_j), shifted by max_j x_j (into *max unless NULL)
float kd_logsumexp(const float *x, int n, float *max);
// x (n) = e^(x - shift) * scale, in place: with shift = kd_logsumexp(x), the softmax * scale
void kd_exp_shift_scale(float *x, int n, float shift, float scale);

/* GELU, tanh approximation (GPT-2's "gelu_new", torch GELU(approximate='tanh')). */
void kd_gelu_tanh_forward(float *out, const float *inp, size_t n);
// dinp (n) overwritten: dout * gelu'(inp)
void kd_gelu_tanh_backward(float *dinp, const float *dout, const float *inp, size_t n);

#endif
