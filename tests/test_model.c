/* test_model: gradients of every layer kind and of whole models against central finite
 * differences (loss = sum_r w_r out_r, evaluated in double), dropout determinism, model
 * validation messages, parameter counts and layout, init bounds and workspace growth. */
#include "kd_kernels.h"
#include "kd_model.h"
#include "kd_rng.h"
#include "kd_test.h"
#include "kd_util.h"

#include <stdint.h>

static void fill(float *x, size_t n, uint64_t seed, float lo, float hi) {
    kd_rng_t rng;
    kd_rng_init(&rng, seed);
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * kd_rng_uniform(&rng);
}

static double dot(const float *w, const float *y, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)w[i] * y[i];
    return s;
}

/* ---- per-layer checks on the kernels the model calls ---- */

/* The layer under test: y = f(x; theta). Each fwd writes y (n_out) from x and theta. */
typedef struct {
    float *x, *theta, *y, *wr; /* wr: the random loss weights (n_out) */
    size_t n_x, n_theta, n_out;
    void (*fwd)(void *ctx);
    void *ctx;
} fd_case_t;

static double fd_loss(fd_case_t *c) {
    c->fwd(c->ctx);
    return dot(c->wr, c->y, c->n_out);
}

/* Compare an analytic gradient g of the loss w.r.t. v (x or theta) with central differences. */
static int fd_check(fd_case_t *c, float *v, size_t n, const float *g, float h, double tol,
                    const char *what) {
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        float keep = v[i];
        v[i] = keep + h;
        double lp = fd_loss(c);
        v[i] = keep - h;
        double lm = fd_loss(c);
        v[i] = keep;
        double fd = (lp - lm) / (2.0 * h);
        CHECK_CLOSE(g[i], fd, tol);
        if (fabs(g[i] - fd) > tol * fmax(1.0, fmax(fabs(g[i]), fabs(fd))) && bad++ < 3)
            fprintf(stderr, "  %s[%zu]: analytic %.6g, finite difference %.6g\n", what, i, g[i],
                    fd);
    }
    return bad;
}

typedef struct {
    fd_case_t c;
    int B, IC, OC;
    kd_conv2d_t d;
    float *scratch;
    int k, s;
    int32_t *idx;
    float *mask;
    float p;
    int kind;
} layer_ctx_t;

static void fwd_linear(void *p) {
    layer_ctx_t *l = p;
    kd_linear_forward(l->c.y, l->c.x, l->c.theta, l->c.theta + (size_t)l->OC * l->IC, l->B, l->IC,
                      l->OC);
}

static void fwd_conv(void *p) {
    layer_ctx_t *l = p;
    size_t nw = (size_t)l->d.OC * l->d.C * l->d.KH * l->d.KW;
    kd_conv2d_forward(l->c.y, l->c.x, l->c.theta, l->c.theta + nw, &l->d, 2, l->scratch);
}

static void fwd_pool(void *p) {
    layer_ctx_t *l = p;
    kd_maxpool2d_forward(l->c.y, l->idx, l->c.x, l->B, l->d.H, l->d.W, l->k, l->s);
}

static void fwd_elem(void *p) {
    layer_ctx_t *l = p;
    if (l->kind == KD_LAYER_RELU) kd_relu_forward(l->c.y, l->c.x, l->c.n_x);
    if (l->kind == KD_LAYER_GELU) kd_gelu_forward(l->c.y, l->c.x, l->c.n_x);
    if (l->kind == KD_LAYER_DROPOUT)
        kd_dropout_forward(l->c.y, l->mask, l->c.x, l->c.n_x, l->p, 1234); /* fixed key */
}

static void setup(layer_ctx_t *l, size_t n_x, size_t n_theta, size_t n_out) {
    l->c.n_x = n_x;
    l->c.n_theta = n_theta;
    l->c.n_out = n_out;
    l->c.x = kd_alloc_floats(n_x);
    l->c.theta = kd_alloc_floats(n_theta);
    l->c.y = kd_alloc_floats(n_out);
    l->c.wr = kd_alloc_floats(n_out);
    l->c.ctx = l;
    fill(l->c.x, n_x, 31, -1.0f, 1.0f);
    fill(l->c.theta, n_theta, 32, -1.0f, 1.0f);
    fill(l->c.wr, n_out, 33, -1.0f, 1.0f);
}

static void teardown(layer_ctx_t *l) {
    free(l->c.x), free(l->c.theta), free(l->c.y), free(l->c.wr);
    free(l->scratch), free(l->idx), free(l->mask);
}

static void test_fd_linear(void) {
    layer_ctx_t l = {.B = 3, .IC = 5, .OC = 4};
    setup(&l, 15, 4 * 5 + 4, 12);
    l.c.fwd = fwd_linear;
    float *dx = kd_alloc_floats(15), *dth = kd_alloc_floats(24);
    kd_linear_backward(dx, dth, dth + 20, l.c.wr, l.c.x, l.c.theta, 3, 5, 4);
    CHECK(fd_check(&l.c, l.c.x, 15, dx, 1e-2f, 1e-3, "linear dx") == 0);
    CHECK(fd_check(&l.c, l.c.theta, 24, dth, 1e-2f, 1e-3, "linear dW,db") == 0);
    free(dx), free(dth);
    teardown(&l);
}

static void test_fd_conv(int B, int C, int H, int W, int OC, int K, int s, int pad) {
    layer_ctx_t l = {.d = kd_conv2d_make(B, C, H, W, OC, K, K, s, pad)};
    size_t nx = (size_t)B * C * H * W, nw = (size_t)OC * C * K * K;
    size_t ny = (size_t)B * OC * l.d.OH * l.d.OW;
    setup(&l, nx, nw + OC, ny);
    l.scratch = kd_alloc_floats(kd_conv2d_scratch_floats(&l.d, 2));
    l.c.fwd = fwd_conv;
    float *dx = kd_alloc_floats(nx), *dth = kd_alloc_floats(nw + OC);
    kd_conv2d_backward(dx, dth, dth + nw, l.c.wr, l.c.x, l.c.theta, &l.d, 2, l.scratch);
    CHECK(fd_check(&l.c, l.c.x, nx, dx, 1e-2f, 1e-3, "conv dx") == 0);
    CHECK(fd_check(&l.c, l.c.theta, nw + OC, dth, 1e-2f, 1e-3, "conv dW,db") == 0);
    free(dx), free(dth);
    teardown(&l);
}

static void test_fd_maxpool(int BC, int H, int W, int k, int s) {
    layer_ctx_t l = {.B = BC, .k = k, .s = s};
    l.d.H = H, l.d.W = W;
    int OH = (H - k) / s + 1, OW = (W - k) / s + 1;
    size_t nx = (size_t)BC * H * W, ny = (size_t)BC * OH * OW;
    setup(&l, nx, 1, ny);
    /* distinct values 0.1 apart, shuffled, so a step of 0.01 never changes an argmax */
    uint32_t *perm = kd_xmalloc(nx * sizeof(uint32_t));
    kd_rng_permutation(5, 0, perm, nx);
    for (size_t i = 0; i < nx; i++) l.c.x[i] = 0.1f * (float)perm[i] - 1.0f;
    free(perm);
    l.idx = kd_xmalloc(ny * sizeof(int32_t));
    l.c.fwd = fwd_pool;
    fwd_pool(&l);
    float *dx = kd_alloc_floats(nx);
    kd_maxpool2d_backward(dx, l.c.wr, l.idx, BC, H, W, OH, OW);
    CHECK(fd_check(&l.c, l.c.x, nx, dx, 1e-2f, 1e-3, "maxpool dx") == 0);
    free(dx);
    teardown(&l);
}

static void test_fd_elementwise(kd_layer_kind_t kind) {
    layer_ctx_t l = {.kind = kind, .p = 0.4f};
    size_t n = 40;
    setup(&l, n, 1, n);
    /* keep relu inputs away from the kink at 0 */
    for (size_t i = 0; i < n; i++) l.c.x[i] += l.c.x[i] < 0 ? -0.1f : 0.1f;
    l.mask = kd_alloc_floats(n);
    l.c.fwd = fwd_elem;
    fwd_elem(&l);
    float *dx = kd_alloc_floats(n);
    if (kind == KD_LAYER_RELU) kd_relu_backward(dx, l.c.wr, l.c.y, n);
    if (kind == KD_LAYER_GELU) kd_gelu_backward(dx, l.c.wr, l.c.x, n);
    if (kind == KD_LAYER_DROPOUT) kd_dropout_backward(dx, l.c.wr, l.mask, n);
    CHECK(fd_check(&l.c, l.c.x, n, dx, 1e-2f, 1e-3, kd_layer_kind_name(kind)) == 0);
    free(dx);
    teardown(&l);
}

/* ---- whole models ---- */

typedef struct {
    kd_model_t *m;
    const float *x;
    float *wr;
    int B;
    uint64_t key;
} model_ctx_t;

static double model_loss(model_ctx_t *c) {
    const float *y = kd_model_forward(c->m, c->x, c->B, true, c->key);
    return dot(c->wr, y, (size_t)c->B * c->m->num_classes);
}

/* Parameter gradients of a model vs central differences on every parameter. */
static void fd_model(const kd_layer_spec_t *specs, int n, kd_shape_t in, int B, const char *name) {
    char err[256] = "";
    kd_model_t *m = NULL;
    CHECK(kd_model_new(specs, n, in, &m, err, sizeof err) == 0);
    if (!m) {
        fprintf(stderr, "%s: %s\n", name, err);
        return;
    }
    kd_model_init_params(m, 77);
    size_t nx = (size_t)B * kd_shape_size(in), ny = (size_t)B * m->num_classes;
    float *x = kd_alloc_floats(nx), *wr = kd_alloc_floats(ny);
    fill(x, nx, 41, -1.0f, 1.0f);
    fill(wr, ny, 42, -1.0f, 1.0f);
    model_ctx_t c = {.m = m, .x = x, .wr = wr, .B = B, .key = 9};
    model_loss(&c);
    kd_model_backward(m, wr);
    float *g = kd_alloc_floats(m->n_params);
    memcpy(g, m->grads, m->n_params * sizeof(float));
    /* float forward passes: step 1e-3, tolerance 1e-2; a relu/maxpool kink crossed by a step
     * would show as one outlier, so allow none but report the worst */
    const float h = 1e-3f;
    int bad = 0;
    double worst = 0.0;
    for (size_t i = 0; i < m->n_params; i++) {
        float keep = m->params[i];
        m->params[i] = keep + h;
        double lp = model_loss(&c);
        m->params[i] = keep - h;
        double lm = model_loss(&c);
        m->params[i] = keep;
        double fd = (lp - lm) / (2.0 * h);
        double e = fabs(fd - g[i]) / fmax(1.0, fabs(fd));
        if (e > worst) worst = e;
        if (e > 1e-2 && bad++ < 3)
            fprintf(stderr, "  %s param %zu: analytic %.6g, finite difference %.6g\n", name, i,
                    g[i], fd);
    }
    CHECK(bad == 0);
    CHECK(m->n_params > 0);
    /* gradients are overwritten, not accumulated */
    model_loss(&c);
    kd_model_backward(m, wr);
    CHECK(memcmp(g, m->grads, m->n_params * sizeof(float)) == 0);
    free(x), free(wr), free(g);
    kd_model_destroy(&m);
    CHECK(m == NULL);
}

static kd_layer_spec_t L_flatten(void) {
    return (kd_layer_spec_t){.kind = KD_LAYER_FLATTEN};
}
static kd_layer_spec_t L_linear(int n) {
    return (kd_layer_spec_t){.kind = KD_LAYER_LINEAR, .out_features = n};
}
static kd_layer_spec_t L_conv(int oc, int k, int s, int p) {
    return (kd_layer_spec_t){
        .kind = KD_LAYER_CONV2D, .out_channels = oc, .kernel = k, .stride = s, .padding = p};
}
static kd_layer_spec_t L_pool(int k, int s) {
    return (kd_layer_spec_t){.kind = KD_LAYER_MAXPOOL2D, .kernel = k, .stride = s};
}
static kd_layer_spec_t L_act(kd_layer_kind_t k) {
    return (kd_layer_spec_t){.kind = k};
}
static kd_layer_spec_t L_drop(float p) {
    return (kd_layer_spec_t){.kind = KD_LAYER_DROPOUT, .p = p};
}

static void test_fd_models(void) {
    kd_layer_spec_t cnn[] = {L_conv(2, 3, 1, 1), L_act(KD_LAYER_RELU), L_pool(2, 0),
                             L_conv(3, 3, 2, 1), L_act(KD_LAYER_GELU), L_flatten(),
                             L_linear(6),        L_act(KD_LAYER_RELU), L_drop(0.3f),
                             L_linear(4)};
    fd_model(cnn, 10, (kd_shape_t){1, 8, 7}, 3, "small cnn");
    kd_layer_spec_t mlp[] = {L_flatten(), L_linear(7),          L_act(KD_LAYER_RELU),
                             L_linear(5), L_act(KD_LAYER_GELU), L_linear(3)};
    fd_model(mlp, 6, (kd_shape_t){2, 3, 2}, 4, "small mlp");
    /* flatten between a conv and a linear, overlapping maxpool, dropout before the first
     * parameter layer */
    kd_layer_spec_t mix[] = {L_drop(0.2f), L_conv(2, 2, 1, 0), L_pool(3, 1),
                             L_flatten(),  L_drop(0.5f),       L_linear(3)};
    fd_model(mix, 6, (kd_shape_t){2, 6, 5}, 2, "mixed");
}

/* ---- structure ---- */

static const kd_layer_spec_t *teacher_cnn(int *n) {
    static kd_layer_spec_t s[11];
    kd_layer_spec_t t[] = {L_conv(32, 3, 0, 1), L_act(KD_LAYER_RELU), L_pool(2, 0),
                           L_conv(64, 3, 0, 1), L_act(KD_LAYER_RELU), L_pool(2, 0),
                           L_flatten(),         L_linear(256),        L_act(KD_LAYER_RELU),
                           L_drop(0.3f),        L_linear(10)};
    memcpy(s, t, sizeof t);
    *n = 11;
    return s;
}

static void test_counts(void) {
    char err[256];
    kd_model_t *m = NULL;
    kd_layer_spec_t mlp[] = {L_flatten(),   L_linear(800),        L_act(KD_LAYER_RELU),
                             L_linear(800), L_act(KD_LAYER_RELU), L_linear(10)};
    CHECK(kd_model_new(mlp, 6, (kd_shape_t){1, 28, 28}, &m, err, sizeof err) == 0);
    CHECK(m->n_params == 1276810);
    CHECK(m->num_classes == 10);
    CHECK(m->layers[1].weight_offset == 0 && m->layers[1].weight_count == 800 * 784);
    CHECK(m->layers[1].bias_offset == 800 * 784 && m->layers[1].bias_count == 800);
    CHECK(m->layers[3].weight_offset == 800 * 784 + 800);
    CHECK(m->layers[1].weight_ndim == 2 && m->layers[1].weight_shape[0] == 800 &&
          m->layers[1].weight_shape[1] == 784);
    CHECK(m->layers[0].weight_count == 0 && m->layers[2].weight_count == 0);
    CHECK(kd_model_forward_flops(m) == 784.0 * 800 + 800.0 * 800 + 800.0 * 10);
    kd_model_destroy(&m);

    int n;
    const kd_layer_spec_t *cnn = teacher_cnn(&n);
    CHECK(kd_model_new(cnn, n, (kd_shape_t){1, 28, 28}, &m, err, sizeof err) == 0);
    size_t c1 = 32 * 9 + 32, c2 = 64 * 32 * 9 + 64, l1 = 3136 * 256 + 256, l2 = 256 * 10 + 10;
    CHECK(m->n_params == c1 + c2 + l1 + l2);
    CHECK(m->n_params == 824458);
    CHECK(m->layers[0].spec.stride == 1 && m->layers[2].spec.stride == 2); /* defaults */
    CHECK(m->layers[2].out.c == 32 && m->layers[2].out.h == 14 && m->layers[2].out.w == 14);
    CHECK(m->layers[6].out.c == 3136 && m->layers[6].out.h == 1);
    CHECK(m->layers[3].weight_ndim == 4 && m->layers[3].weight_shape[0] == 64 &&
          m->layers[3].weight_shape[1] == 32 && m->layers[3].weight_shape[2] == 3 &&
          m->layers[3].weight_shape[3] == 3);
    CHECK(m->layers[3].weight_offset == c1 && m->layers[3].bias_offset == c1 + 64 * 32 * 9);
    CHECK(m->layers[10].bias_offset + m->layers[10].bias_count == m->n_params);
    double flops = 32.0 * 9 * 784 + 64.0 * 288 * 196 + 3136.0 * 256 + 2560.0;
    CHECK(kd_model_forward_flops(m) == flops);
    kd_model_destroy(&m);
    kd_model_destroy(&m); /* NULL-safe */
    kd_model_destroy(NULL);
}

static void expect_err(const kd_layer_spec_t *s, int n, kd_shape_t in, const char *a,
                       const char *b) {
    char err[256] = "";
    kd_model_t *m = (kd_model_t *)&err; /* must be reset to NULL */
    CHECK(kd_model_new(s, n, in, &m, err, sizeof err) == -1);
    CHECK(m == NULL);
    CHECK_ERR_HAS(err, a);
    CHECK_ERR_HAS(err, b);
}

static void test_validation(void) {
    kd_shape_t img = {1, 28, 28};
    kd_layer_spec_t a[] = {L_conv(32, 3, 1, 1), L_pool(4, 0), L_linear(10)};
    expect_err(a, 3, img, "layer 2 (linear): input is 32x7x7", "add a flatten layer first");
    kd_layer_spec_t b[] = {L_flatten(), L_conv(4, 3, 1, 0), L_flatten()};
    expect_err(b, 3, img, "layer 1 (conv2d)", "spatial");
    kd_layer_spec_t c[] = {L_conv(4, 0, 1, 0), L_flatten()};
    expect_err(c, 2, img, "layer 0 (conv2d)", "kernel must be >= 1");
    kd_layer_spec_t d[] = {L_conv(4, 3, 1, -1), L_flatten()};
    expect_err(d, 2, img, "layer 0 (conv2d)", "padding -1");
    kd_layer_spec_t e[] = {L_flatten(), L_drop(1.0f)};
    expect_err(e, 2, img, "layer 1 (dropout)", "p must be in [0, 1)");
    kd_layer_spec_t e2[] = {L_flatten(), L_drop(-0.1f)};
    expect_err(e2, 2, img, "layer 1 (dropout)", "p must be in [0, 1)");
    kd_layer_spec_t f[] = {L_flatten(), L_linear(0)};
    expect_err(f, 2, img, "layer 1 (linear)", "out_features must be >= 1");
    kd_layer_spec_t g[] = {L_conv(4, 3, 1, 1), L_act(KD_LAYER_RELU)};
    expect_err(g, 2, img, "layer 1 (relu)", "last output must be flat");
    kd_layer_spec_t h[] = {L_conv(4, 3, 1, 0), L_conv(4, 30, 1, 0), L_flatten()};
    expect_err(h, 3, img, "layer 1 (conv2d)", "kernel 30 does not fit");
    kd_layer_spec_t i[] = {L_pool(29, 0), L_flatten()};
    expect_err(i, 2, img, "layer 0 (maxpool2d)", "does not fit");
    kd_layer_spec_t j[] = {L_conv(0, 3, 1, 0), L_flatten()};
    expect_err(j, 2, img, "layer 0 (conv2d)", "out_channels");
    kd_layer_spec_t k[] = {L_conv(2, 3, -2, 0), L_flatten()};
    expect_err(k, 2, img, "layer 0 (conv2d)", "stride");
    kd_layer_spec_t l[] = {{.kind = (kd_layer_kind_t)42}};
    expect_err(l, 1, img, "layer 0", "unknown layer kind");
    expect_err(a, 0, img, "model", "layers");
    expect_err(f, 2, (kd_shape_t){0, 28, 28}, "model", "input shape");
}

static void test_init(void) {
    char err[256];
    kd_model_t *m = NULL, *m2 = NULL;
    int n;
    const kd_layer_spec_t *cnn = teacher_cnn(&n);
    CHECK(kd_model_new(cnn, n, (kd_shape_t){1, 28, 28}, &m, err, sizeof err) == 0);
    CHECK(kd_model_new(cnn, n, (kd_shape_t){1, 28, 28}, &m2, err, sizeof err) == 0);
    bool zero = true;
    for (size_t i = 0; i < m->n_params; i++) zero &= m->params[i] == 0.0f;
    CHECK(zero); /* zeroed until init */
    kd_model_init_params(m, 5);
    kd_model_init_params(m2, 5);
    CHECK(memcmp(m->params, m2->params, m->n_params * sizeof(float)) == 0);
    kd_model_init_params(m2, 6);
    CHECK(memcmp(m->params, m2->params, m->n_params * sizeof(float)) != 0);
    for (int l = 0; l < m->n_layers; l++) {
        const kd_layer_t *L = &m->layers[l];
        if (!L->weight_count) continue;
        size_t fan_in = L->weight_count / (size_t)L->weight_shape[0];
        double bound = 1.0 / sqrt((double)fan_in), wmax = 0.0, bmax = 0.0, mean = 0.0;
        for (size_t i = 0; i < L->weight_count; i++) {
            double v = m->params[L->weight_offset + i];
            wmax = fmax(wmax, fabs(v));
            mean += v / (double)L->weight_count;
        }
        for (size_t i = 0; i < L->bias_count; i++)
            bmax = fmax(bmax, fabs(m->params[L->bias_offset + i]));
        CHECK(wmax <= bound && bmax <= bound);
        CHECK(wmax > 0.9 * bound); /* uniform over the whole interval */
        CHECK(bmax > 0.3 * bound);
        CHECK(fabs(mean) < 0.1 * bound);
    }
    kd_model_destroy(&m);
    kd_model_destroy(&m2);
}

static void test_dropout_model(void) {
    char err[256];
    kd_model_t *m = NULL, *m2 = NULL;
    kd_layer_spec_t s[] = {L_flatten(), L_drop(0.5f)};
    CHECK(kd_model_new(s, 2, (kd_shape_t){4, 10, 10}, &m, err, sizeof err) == 0);
    CHECK(kd_model_new(s, 2, (kd_shape_t){4, 10, 10}, &m2, err, sizeof err) == 0);
    CHECK(m->n_params == 0 && m->num_classes == 400);
    enum { B = 5, N = B * 400 };
    float x[N], y1[N];
    for (int i = 0; i < N; i++) x[i] = 1.0f + (float)(i % 3);
    memcpy(y1, kd_model_forward(m, x, B, true, 17), sizeof y1);
    /* same key, another model (as in another process): the same mask */
    CHECK(memcmp(y1, kd_model_forward(m2, x, B, true, 17), sizeof y1) == 0);
    const float *y2 = kd_model_forward(m, x, B, true, 18);
    CHECK(memcmp(y1, y2, sizeof y1) != 0);
    int kept = 0;
    for (int i = 0; i < N; i++) {
        CHECK(y1[i] == 0.0f || y1[i] == 2.0f * x[i]);
        kept += y1[i] != 0.0f;
    }
    CHECK(kept > N * 0.4 && kept < N * 0.6);
    const float *y3 = kd_model_forward(m, x, B, false, 17);
    CHECK(memcmp(y3, x, sizeof x) == 0); /* eval: identity */
    /* the mask depends on the layer index: two dropouts see different masks */
    kd_model_destroy(&m);
    kd_layer_spec_t s2[] = {L_flatten(), L_drop(0.5f), L_drop(0.5f)};
    kd_layer_spec_t s3[] = {L_flatten(), L_act(KD_LAYER_RELU), L_drop(0.5f)};
    CHECK(kd_model_new(s2, 3, (kd_shape_t){4, 10, 10}, &m, err, sizeof err) == 0);
    const float *y4 = kd_model_forward(m, x, B, true, 17);
    int both = 0;
    for (int i = 0; i < N; i++) both += y4[i] != 0.0f;
    CHECK(both > N * 0.15 && both < N * 0.35);
    kd_model_destroy(&m);
    kd_model_destroy(&m2);
    CHECK(kd_model_new(s3, 3, (kd_shape_t){4, 10, 10}, &m, err, sizeof err) == 0);
    const float *y5 = kd_model_forward(m, x, B, true, 17);
    CHECK(memcmp(y5, y1, sizeof y1) != 0); /* layer 2, not layer 1 */
    kd_model_destroy(&m);
}

/* Forward at B=4, then 64, then 4 again equals a fresh model at B=4 (and so do gradients). */
static void test_workspace_growth(void) {
    char err[256];
    kd_model_t *m = NULL, *fresh = NULL;
    kd_layer_spec_t s[] = {L_conv(4, 3, 1, 1), L_act(KD_LAYER_RELU), L_pool(2, 0),
                           L_conv(6, 3, 2, 0), L_act(KD_LAYER_GELU), L_flatten(),
                           L_linear(16),       L_act(KD_LAYER_RELU), L_drop(0.3f),
                           L_linear(5)};
    kd_shape_t in = {2, 12, 10};
    CHECK(kd_model_new(s, 10, in, &m, err, sizeof err) == 0);
    CHECK(kd_model_new(s, 10, in, &fresh, err, sizeof err) == 0);
    kd_model_init_params(m, 3);
    kd_model_init_params(fresh, 3);
    size_t per = kd_shape_size(in);
    float *x = kd_alloc_floats(64 * per), *dl = kd_alloc_floats(64 * 5);
    fill(x, 64 * per, 51, -1.0f, 1.0f);
    fill(dl, 64 * 5, 52, -1.0f, 1.0f);
    float ref[4 * 5], *gref = kd_alloc_floats(fresh->n_params);
    memcpy(ref, kd_model_forward(fresh, x, 4, true, 8), sizeof ref);
    kd_model_backward(fresh, dl);
    memcpy(gref, fresh->grads, fresh->n_params * sizeof(float));

    CHECK(memcmp(ref, kd_model_forward(m, x, 4, false, 8), sizeof ref) != 0); /* eval differs */
    const float *y64 = kd_model_forward(m, x, 64, false, 8);
    kd_model_backward(m, dl);
    const float *y = kd_model_forward(m, x, 4, true, 8);
    CHECK(memcmp(ref, y, sizeof ref) == 0);
    kd_model_backward(m, dl);
    CHECK(memcmp(gref, m->grads, m->n_params * sizeof(float)) == 0);
    /* the eval-mode logits of the first 4 samples do not depend on the batch around them */
    float e4[4 * 5];
    memcpy(e4, kd_model_forward(fresh, x, 4, false, 0), sizeof e4);
    y64 = kd_model_forward(m, x, 64, false, 0);
    for (int i = 0; i < 20; i++) CHECK_CLOSE(y64[i], e4[i], 1e-6);
    for (int i = 0; i < m->n_layers; i++) CHECK(m->forward_seconds[i] >= 0.0);
    CHECK(m->forward_seconds[3] > 0.0 && m->backward_seconds[3] > 0.0);
    free(x), free(dl), free(gref);
    kd_model_destroy(&m);
    kd_model_destroy(&fresh);
}

/* relu runs in place on workspace buffers, but never on the caller's input. */
static void test_input_untouched(void) {
    char err[256];
    kd_model_t *m = NULL;
    kd_layer_spec_t s[] = {L_flatten(), L_act(KD_LAYER_RELU), L_drop(0.5f), L_act(KD_LAYER_RELU),
                           L_linear(3)};
    CHECK(kd_model_new(s, 5, (kd_shape_t){1, 3, 4}, &m, err, sizeof err) == 0);
    kd_model_init_params(m, 1);
    float x[2 * 12], x0[2 * 12];
    fill(x, 24, 61, -1.0f, 1.0f);
    memcpy(x0, x, sizeof x);
    kd_model_forward(m, x, 2, false, 0);
    kd_model_forward(m, x, 2, true, 0);
    CHECK(memcmp(x, x0, sizeof x) == 0);
    kd_model_destroy(&m);
}

int main(void) {
    kd_set_threads(1);
    test_fd_linear();
    test_fd_conv(2, 2, 6, 5, 3, 3, 2, 1);
    test_fd_conv(1, 3, 5, 7, 2, 3, 1, 2);
    test_fd_conv(3, 1, 4, 4, 2, 2, 1, 0);
    test_fd_maxpool(3, 6, 7, 2, 2);
    test_fd_maxpool(2, 7, 6, 3, 2);
    test_fd_maxpool(2, 5, 5, 2, 1);
    test_fd_elementwise(KD_LAYER_RELU);
    test_fd_elementwise(KD_LAYER_GELU);
    test_fd_elementwise(KD_LAYER_DROPOUT);
    test_fd_models();
    test_counts();
    test_validation();
    test_init();
    test_dropout_model();
    test_workspace_growth();
    test_input_untouched();
    return kd_test_done("test_model");
}
