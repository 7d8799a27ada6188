/* test_kernels: every BLAS-backed kernel against its naive reference loop, on several shapes
 * (stride 2, padding 0/1/2, non-square images, batch 1, uneven GEMM groups), plus the
 * non-BLAS kernels against closed forms and the sgemm shape trace. */
#include "kd_kernels.h"
#include "kd_rng.h"
#include "kd_test.h"
#include "kd_util.h"

#include <stdint.h>

static void fill(float *x, size_t n, uint64_t seed) {
    kd_rng_t rng;
    kd_rng_init(&rng, seed);
    for (size_t i = 0; i < n; i++) x[i] = 2.0f * kd_rng_uniform(&rng) - 1.0f;
}

/* Garbage (NaN) in outputs and scratch, so a kernel that reads before writing shows up. */
static float *alloc_nan(size_t n) {
    float *p = kd_alloc_floats(n);
    for (size_t i = 0; i < n; i++) p[i] = NAN;
    return p;
}

/* max |a - b| / max(1, max |b|) */
static double rel_diff(const float *a, const float *b, size_t n) {
    double md = 0.0, mb = 1.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= md)) md = d; /* NaN propagates */
        if (fabs(b[i]) > mb) mb = fabs(b[i]);
    }
    return md / mb;
}

static void test_linear(int B, int IC, int OC, bool with_bias) {
    float *x = kd_alloc_floats((size_t)B * IC), *w = kd_alloc_floats((size_t)OC * IC);
    float *b = kd_alloc_floats(OC), *dout = kd_alloc_floats((size_t)B * OC);
    fill(x, (size_t)B * IC, 1);
    fill(w, (size_t)OC * IC, 2);
    fill(b, OC, 3);
    fill(dout, (size_t)B * OC, 4);
    float *y = alloc_nan((size_t)B * OC), *y_ref = alloc_nan((size_t)B * OC);
    kd_linear_forward(y, x, w, with_bias ? b : NULL, B, IC, OC);
    kd_linear_forward_naive(y_ref, x, w, with_bias ? b : NULL, B, IC, OC);
    CHECK(rel_diff(y, y_ref, (size_t)B * OC) < 1e-5);

    float *dx = alloc_nan((size_t)B * IC), *dw = alloc_nan((size_t)OC * IC), *db = alloc_nan(OC);
    float *dx_r = alloc_nan((size_t)B * IC), *dw_r = alloc_nan((size_t)OC * IC);
    float *db_r = alloc_nan(OC);
    kd_linear_backward(dx, dw, db, dout, x, w, B, IC, OC);
    kd_linear_backward_naive(dx_r, dw_r, db_r, dout, x, w, B, IC, OC);
    CHECK(rel_diff(dx, dx_r, (size_t)B * IC) < 1e-5);
    CHECK(rel_diff(dw, dw_r, (size_t)OC * IC) < 1e-5);
    CHECK(rel_diff(db, db_r, OC) < 1e-5);
    /* dinp NULL skips the input gradient but still fills dweight, dbias */
    float *dw2 = alloc_nan((size_t)OC * IC), *db2 = alloc_nan(OC);
    kd_linear_backward(NULL, dw2, db2, dout, x, w, B, IC, OC);
    CHECK(rel_diff(dw2, dw_r, (size_t)OC * IC) < 1e-5);
    CHECK(rel_diff(db2, db_r, OC) < 1e-5);
    free(x), free(w), free(b), free(dout), free(y), free(y_ref), free(dx), free(dw), free(db);
    free(dx_r), free(dw_r), free(db_r), free(dw2), free(db2);
}

static void test_conv(int B, int C, int H, int W, int OC, int K, int stride, int pad) {
    kd_conv2d_t d = kd_conv2d_make(B, C, H, W, OC, K, K, stride, pad);
    CHECK(d.OH == (H + 2 * pad - K) / stride + 1 && d.OW == (W + 2 * pad - K) / stride + 1);
    size_t nin = (size_t)B * C * H * W, nout = (size_t)B * OC * d.OH * d.OW;
    size_t nw = (size_t)OC * C * K * K;
    float *x = kd_alloc_floats(nin), *w = kd_alloc_floats(nw), *b = kd_alloc_floats(OC);
    float *dout = kd_alloc_floats(nout);
    fill(x, nin, 11);
    fill(w, nw, 12);
    fill(b, OC, 13);
    fill(dout, nout, 14);
    float *y_ref = alloc_nan(nout), *dx_r = alloc_nan(nin), *dw_r = alloc_nan(nw);
    float *db_r = alloc_nan(OC);
    kd_conv2d_forward_naive(y_ref, x, w, b, &d);
    kd_conv2d_backward_naive(dx_r, dw_r, db_r, dout, x, w, &d);

    int groups[] = {1, 2, 3, B};
    for (int gi = 0; gi < 4; gi++) {
        int g = groups[gi];
        float *scratch = alloc_nan(kd_conv2d_scratch_floats(&d, g < B ? g : B));
        float *y = alloc_nan(nout), *dx = alloc_nan(nin), *dw = alloc_nan(nw), *db = alloc_nan(OC);
        kd_conv2d_forward(y, x, w, b, &d, g, scratch);
        double e = rel_diff(y, y_ref, nout);
        CHECK(e < 1e-5);
        if (!(e < 1e-5))
            fprintf(stderr, "  conv fwd B%d C%d %dx%d OC%d K%d s%d p%d g%d: %g\n", B, C, H, W, OC,
                    K, stride, pad, g, e);
        kd_conv2d_backward(dx, dw, db, dout, x, w, &d, g, scratch);
        CHECK(rel_diff(dx, dx_r, nin) < 1e-5);
        CHECK(rel_diff(dw, dw_r, nw) < 1e-5);
        CHECK(rel_diff(db, db_r, OC) < 1e-5);
        /* without dinp and without bias */
        float *dw2 = alloc_nan(nw);
        kd_conv2d_backward(NULL, dw2, NULL, dout, x, w, &d, g, scratch);
        CHECK(rel_diff(dw2, dw_r, nw) < 1e-5);
        kd_conv2d_forward(y, x, w, NULL, &d, g, scratch);
        float *y_nb = alloc_nan(nout);
        kd_conv2d_forward_naive(y_nb, x, w, NULL, &d);
        CHECK(rel_diff(y, y_nb, nout) < 1e-5);
        free(scratch), free(y), free(dx), free(dw), free(db), free(dw2), free(y_nb);
    }
    free(x), free(w), free(b), free(dout), free(y_ref), free(dx_r), free(dw_r), free(db_r);
}

/* A conv2d against hand-computed values: a 1x1x3x3 image, 2x2 kernel of ones, padding 1. */
static void test_conv_closed_form(void) {
    float x[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9}, w[4] = {1, 1, 1, 1}, b[1] = {0.5f};
    kd_conv2d_t d = kd_conv2d_make(1, 1, 3, 3, 1, 2, 2, 2, 1);
    CHECK(d.OH == 2 && d.OW == 2);
    float y[4], scratch[64];
    kd_conv2d_forward(y, x, w, b, &d, 1, scratch);
    /* windows at rows/cols {-1,0} and {1,2} */
    CHECK_CLOSE(y[0], 1 + 0.5, 1e-6);
    CHECK_CLOSE(y[1], 2 + 3 + 0.5, 1e-6);
    CHECK_CLOSE(y[2], 4 + 7 + 0.5, 1e-6);
    CHECK_CLOSE(y[3], 5 + 6 + 8 + 9 + 0.5, 1e-6);
}

static void naive_maxpool(float *out, int32_t *idx, const float *x, int BC, int H, int W, int k,
                          int s) {
    int OH = (H - k) / s + 1, OW = (W - k) / s + 1;
    for (int p = 0; p < BC; p++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                float best = -INFINITY;
                int bi = -1;
                for (int kh = 0; kh < k; kh++)
                    for (int kw = 0; kw < k; kw++) {
                        int i = (oh * s + kh) * W + ow * s + kw;
                        if (bi < 0 || x[(size_t)p * H * W + i] > best) {
                            best = x[(size_t)p * H * W + i];
                            bi = i;
                        }
                    }
                out[((size_t)p * OH + oh) * OW + ow] = best;
                idx[((size_t)p * OH + oh) * OW + ow] = bi;
            }
}

static void test_maxpool(int BC, int H, int W, int k, int s) {
    int OH = (H - k) / s + 1, OW = (W - k) / s + 1;
    size_t nin = (size_t)BC * H * W, nout = (size_t)BC * OH * OW;
    float *x = kd_alloc_floats(nin), *y = alloc_nan(nout), *y_r = alloc_nan(nout);
    int32_t *ix = kd_xcalloc(nout, sizeof(int32_t)), *ix_r = kd_xcalloc(nout, sizeof(int32_t));
    fill(x, nin, 21);
    for (size_t i = 0; i < nin; i += 5) x[i] = 0.25f; /* ties: the first in scan order wins */
    kd_maxpool2d_forward(y, ix, x, BC, H, W, k, s);
    naive_maxpool(y_r, ix_r, x, BC, H, W, k, s);
    CHECK(rel_diff(y, y_r, nout) == 0.0);
    CHECK(memcmp(ix, ix_r, nout * sizeof(int32_t)) == 0);
    /* backward: each output's gradient lands on its argmax, summed where windows overlap */
    float *dy = kd_alloc_floats(nout), *dx = alloc_nan(nin), *dx_r = kd_alloc_floats(nin);
    fill(dy, nout, 22);
    kd_maxpool2d_backward(dx, dy, ix, BC, H, W, OH, OW);
    for (size_t i = 0; i < nout; i++) dx_r[(i / ((size_t)OH * OW)) * H * W + ix_r[i]] += dy[i];
    CHECK(rel_diff(dx, dx_r, nin) < 1e-6);
    free(x), free(y), free(y_r), free(ix), free(ix_r), free(dy), free(dx), free(dx_r);
}

static void test_maxpool_nan(void) {
    float x[4] = {1.0f, NAN, 3.0f, 2.0f}, y[1];
    int32_t ix[1];
    kd_maxpool2d_forward(y, ix, x, 1, 2, 2, 2, 2);
    CHECK(isnan(y[0]) && ix[0] == 1); /* as PyTorch: NaN propagates */
}

static void test_elementwise(void) {
    float x[6] = {-2.0f, -1.0f, -0.0f, 0.5f, 1.0f, 3.0f}, y[6], dx[6];
    float ones[6] = {1, 1, 1, 1, 1, 1};
    kd_relu_forward(y, x, 6);
    CHECK(y[0] == 0.0f && y[1] == 0.0f && y[2] == 0.0f && y[3] == 0.5f && y[5] == 3.0f);
    kd_relu_backward(dx, ones, y, 6);
    CHECK(dx[0] == 0.0f && dx[2] == 0.0f && dx[3] == 1.0f && dx[5] == 1.0f);
    /* GELU(x) = x Phi(x): closed-form values from the normal CDF */
    kd_gelu_forward(y, x, 6);
    CHECK_CLOSE(y[0], -0.045500264, 1e-6);
    CHECK_CLOSE(y[1], -0.158655254, 1e-6);
    CHECK_CLOSE(y[4], 0.841344746, 1e-6);
    CHECK_CLOSE(y[5], 2.995950350, 1e-6);
    /* GELU'(x) = Phi(x) + x phi(x); at 0 it is 1/2, at 1 it is 0.841345 + 0.241971 */
    kd_gelu_backward(dx, ones, x, 6);
    CHECK_CLOSE(dx[2], 0.5, 1e-6);
    CHECK_CLOSE(dx[4], 0.841344746 + 0.241970725, 1e-6);
}

static void test_dropout(void) {
    enum { N = 20000 };
    float *x = kd_alloc_floats(N), *y = kd_alloc_floats(N), *mask = kd_alloc_floats(N);
    float *y2 = kd_alloc_floats(N), *mask2 = kd_alloc_floats(N);
    for (int i = 0; i < N; i++) x[i] = 1.0f + (float)(i % 7);
    float p = 0.3f;
    kd_dropout_forward(y, mask, x, N, p, 99);
    int kept = 0;
    bool values_ok = true;
    for (int i = 0; i < N; i++) {
        if (mask[i] != 0.0f) {
            kept++;
            values_ok &= mask[i] == 1.0f / (1.0f - p) && y[i] == x[i] * mask[i];
        } else {
            values_ok &= y[i] == 0.0f;
        }
    }
    CHECK(values_ok);
    CHECK_CLOSE((double)kept / N, 1.0 - p, 0.02);
    kd_dropout_forward(y2, mask2, x, N, p, 99);
    CHECK(memcmp(mask, mask2, N * sizeof(float)) == 0);
    kd_dropout_forward(y2, mask2, x, N, p, 100);
    CHECK(memcmp(mask, mask2, N * sizeof(float)) != 0);
    kd_dropout_backward(y2, x, mask, N);
    CHECK(rel_diff(y2, y, N) == 0.0);
    free(x), free(y), free(mask), free(y2), free(mask2);
}

static void test_trace(void) {
    float x[6] = {1, 2, 3, 4, 5, 6}, w[6] = {1, 0, 0, 0, 1, 0}, y[4];
    kd_sgemm_call_t calls[4];
    kd_sgemm_trace_begin(calls, 4);
    kd_linear_forward(y, x, w, NULL, 2, 3, 2);
    float dw[6], dx[6];
    kd_linear_backward(dx, dw, NULL, y, x, w, 2, 3, 2);
    int n = kd_sgemm_trace_end();
    CHECK(n == 3);
    CHECK(calls[0].ta == CblasNoTrans && calls[0].tb == CblasTrans);
    CHECK(calls[0].M == 2 && calls[0].N == 2 && calls[0].K == 3);
    CHECK(calls[1].M == 2 && calls[1].N == 3 && calls[1].K == 2); /* dinp */
    CHECK(calls[2].ta == CblasTrans && calls[2].M == 2 && calls[2].N == 3 && calls[2].K == 2);
    CHECK(y[0] == 1 && y[1] == 2 && y[2] == 4 && y[3] == 5);
    /* past cap: counted, not stored; after end, nothing is recorded */
    kd_sgemm_trace_begin(calls, 1);
    calls[1].M = -7;
    kd_linear_forward(y, x, w, NULL, 2, 3, 2);
    kd_linear_forward(y, x, w, NULL, 2, 3, 2);
    CHECK(kd_sgemm_trace_end() == 2);
    CHECK(calls[1].M == -7);
    kd_linear_forward(y, x, w, NULL, 2, 3, 2);
    kd_sgemm_trace_begin(NULL, 0);
    CHECK(kd_sgemm_trace_end() == 0);
}

int main(void) {
    test_linear(1, 3, 2, true);
    test_linear(7, 13, 5, true);
    test_linear(32, 64, 17, false);
    test_linear(5, 100, 40, true);
    /* B, C, H, W, OC, K, stride, pad */
    test_conv(1, 1, 5, 5, 2, 3, 1, 0);
    test_conv(2, 3, 7, 5, 4, 3, 2, 1);
    test_conv(3, 2, 8, 6, 3, 3, 1, 2);
    test_conv(2, 4, 9, 9, 5, 2, 2, 0);
    test_conv(1, 3, 6, 7, 2, 1, 1, 0);
    test_conv(4, 2, 10, 8, 3, 5, 3, 2);
    test_conv(5, 3, 6, 6, 4, 3, 1, 1);
    test_conv(2, 2, 4, 11, 3, 3, 2, 2);
    test_conv(3, 8, 14, 14, 16, 3, 1, 1);
    test_conv_closed_form();
    test_maxpool(3, 8, 8, 2, 2);
    test_maxpool(2, 7, 5, 2, 2); /* floor mode drops the last row and column */
    test_maxpool(2, 9, 6, 3, 2);
    test_maxpool(1, 5, 6, 2, 1); /* overlapping windows */
    test_maxpool(4, 6, 9, 3, 3);
    test_maxpool_nan();
    test_elementwise();
    test_dropout();
    test_trace();
    return kd_test_done("test_kernels");
}
