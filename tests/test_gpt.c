/* test_gpt: the GPT-2 kernels against their naive loops and finite differences, and the whole
 * model's gradient against finite differences of its loss (with and without dropout), the
 * chunked head against a dense computation, and determinism. The PyTorch reference is
 * test_gpt_torch. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd_gpt.h"
#include "kd_kernels.h"
#include "kd_rng.h"
#include "kd_test.h"
#include "kd_util.h"

static void fill(float *x, size_t n, uint64_t seed, float scale) {
    kd_rng_t r;
    kd_rng_init(&r, seed);
    for (size_t i = 0; i < n; i++) x[i] = scale * (2.0f * kd_rng_uniform(&r) - 1.0f);
}

static double max_rel(const float *a, const float *b, size_t n) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]) / fmax(1e-3, fmax(fabs(a[i]), fabs(b[i])));
        if (d > worst) worst = d;
    }
    return worst;
}

static double dot(const float *a, const float *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* ---- kernels -------------------------------------------------------------------------------- */

static void test_conv1d(void) {
    const int N = 7, IC = 5, OC = 9;
    float x[N * IC], w[IC * OC], b[OC], dy[N * OC];
    fill(x, N * IC, 1, 1), fill(w, IC * OC, 2, 1), fill(b, OC, 3, 1), fill(dy, N * OC, 4, 1);
    float y1[N * OC], y2[N * OC];
    kd_conv1d_forward(y1, x, w, b, N, IC, OC);
    kd_conv1d_forward_naive(y2, x, w, b, N, IC, OC);
    CHECK(max_rel(y1, y2, N * OC) < 1e-5);
    float dx1[N * IC], dx2[N * IC], dw1[IC * OC], dw2[IC * OC], db1[OC], db2[OC];
    for (int i = 0; i < IC * OC; i++) dw1[i] = dw2[i] = 0.5f; /* weight grads accumulate */
    for (int i = 0; i < OC; i++) db1[i] = db2[i] = -0.25f;
    kd_conv1d_backward(dx1, dw1, db1, dy, x, w, N, IC, OC);
    kd_conv1d_backward_naive(dx2, dw2, db2, dy, x, w, N, IC, OC);
    CHECK(max_rel(dx1, dx2, N * IC) < 1e-5);
    CHECK(max_rel(dw1, dw2, IC * OC) < 1e-5);
    CHECK(max_rel(db1, db2, OC) < 1e-5);
    /* the naive loop is the definition: y[n,o] = b[o] + sum_i x[n,i] w[i,o] */
    CHECK(fabs(y2[2 * OC + 3] -
               (b[3] + dot(x + 2 * IC,
                           (float[]){w[3], w[OC + 3], w[2 * OC + 3], w[3 * OC + 3], w[4 * OC + 3]},
                           IC))) < 1e-5);
}

/* d(sum(dy * f(x)))/dx by central differences, in double over float evaluations. */
typedef void (*fwd_fn)(void *ctx, const float *x, float *y);

static void fd_grad(fwd_fn f, void *ctx, float *x, size_t nx, const float *dy, size_t ny, float h,
                    double *out) {
    float *y = kd_xmalloc(ny * sizeof *y);
    for (size_t i = 0; i < nx; i++) {
        float keep = x[i];
        x[i] = keep + h;
        f(ctx, x, y);
        double up = dot(y, dy, ny);
        x[i] = keep - h;
        f(ctx, x, y);
        double down = dot(y, dy, ny);
        x[i] = keep;
        out[i] = (up - down) / (2.0 * h);
    }
    free(y);
}

static bool close_to_fd(const float *g, const double *fd, size_t n, double tol) {
    bool ok = true;
    for (size_t i = 0; i < n; i++)
        if (fabs(g[i] - fd[i]) > tol * fmax(1.0, fabs(fd[i]))) {
            fprintf(stderr, "  [%zu] analytic %.7g vs finite differences %.7g\n", i, (double)g[i],
                    fd[i]);
            ok = false;
        }
    return ok;
}

struct ln_ctx {
    const float *w, *b;
    int N, C;
};

static void ln_fwd(void *c_, const float *x, float *y) {
    struct ln_ctx *c = c_;
    float mean[16], rstd[16];
    kd_layernorm_forward(y, mean, rstd, x, c->w, c->b, c->N, c->C, KD_GPT_LN_EPS);
}

static void test_layernorm(void) {
    enum { N = 3, C = 6 };
    float x[N * C], w[C], b[C], dy[N * C], y[N * C], mean[N], rstd[N];
    fill(x, N * C, 5, 2), fill(w, C, 6, 1), fill(b, C, 7, 1), fill(dy, N * C, 8, 1);
    kd_layernorm_forward(y, mean, rstd, x, w, b, N, C, KD_GPT_LN_EPS);
    /* closed form: every row of (y - b)/w has mean 0 and variance 1 (up to eps) */
    for (int n = 0; n < N; n++) {
        double m = 0, v = 0;
        for (int i = 0; i < C; i++) m += (y[n * C + i] - b[i]) / w[i];
        for (int i = 0; i < C; i++) v += pow((y[n * C + i] - b[i]) / w[i] - m / C, 2);
        CHECK(fabs(m / C) < 1e-5 && fabs(v / C - 1.0) < 1e-3);
    }
    float dx[N * C] = {0}, dw[C] = {0}, db[C] = {0};
    kd_layernorm_backward(dx, dw, db, dy, x, w, mean, rstd, N, C);
    double fd[N * C];
    struct ln_ctx ctx = {w, b, N, C};
    fd_grad(ln_fwd, &ctx, x, N * C, dy, N * C, 1e-2f, fd);
    CHECK(close_to_fd(dx, fd, N * C, 2e-3));
}

static void gelu_fwd(void *n_, const float *x, float *y) {
    kd_gelu_tanh_forward(y, x, *(size_t *)n_);
}

static void test_gelu_tanh(void) {
    enum { n = 9 };
    float x[n] = {-4, -2, -1, -0.3f, 0, 0.2f, 1, 2.5f, 5}, y[n], dy[n], dx[n];
    kd_gelu_tanh_forward(y, x, n);
    /* torch.nn.functional.gelu(x, approximate='tanh') at 1 and -1 */
    CHECK(fabs(y[6] - 0.841192f) < 1e-5 && fabs(y[2] - -0.158808f) < 1e-5 && y[4] == 0.0f);
    for (int i = 0; i < n; i++) dy[i] = 1.0f + 0.1f * i;
    kd_gelu_tanh_backward(dx, dy, x, n);
    double fd[n];
    size_t nn = n;
    fd_grad(gelu_fwd, &nn, x, n, dy, n, 1e-3f, fd);
    CHECK(close_to_fd(dx, fd, n, 2e-3));
}

struct att_ctx {
    int B, T, C, NH;
    float *att;
};

static void att_fwd(void *c_, const float *qkv, float *y) {
    struct att_ctx *c = c_;
    kd_attention_forward(y, c->att, qkv, c->B, c->T, c->C, c->NH);
}

static void test_attention(void) {
    enum { B = 2, T = 5, C = 8, NH = 2 };
    float qkv[B * T * 3 * C], y1[B * T * C], y2[B * T * C], a1[B * NH * T * T], a2[B * NH * T * T],
        dy[B * T * C];
    fill(qkv, sizeof qkv / 4, 9, 1.5f), fill(dy, sizeof dy / 4, 10, 1);
    kd_attention_forward(y1, a1, qkv, B, T, C, NH);
    kd_attention_forward_naive(y2, a2, qkv, B, T, C, NH);
    CHECK(max_rel(y1, y2, B * T * C) < 1e-5);
    CHECK(max_rel(a1, a2, B * NH * T * T) < 1e-5);
    /* causal: rows sum to 1 and nothing above the diagonal; position 0 sees only itself */
    bool causal = true;
    for (int r = 0; r < B * NH * T; r++) {
        int t = r % T;
        double sum = 0;
        for (int j = 0; j < T; j++) {
            sum += a1[r * T + j];
            if (j > t && a1[r * T + j] != 0.0f) causal = false;
        }
        if (fabs(sum - 1.0) > 1e-5) causal = false;
    }
    CHECK(causal);
    CHECK(fabs(y1[0] - qkv[2 * C]) < 1e-6); /* (b 0, t 0, head 0) output = its own v */
    /* changing a later position's k/v does not change an earlier output */
    float later[sizeof qkv / 4];
    memcpy(later, qkv, sizeof qkv);
    later[(T - 1) * 3 * C + C] += 3.0f;
    later[(T - 1) * 3 * C + 2 * C] += 3.0f;
    kd_attention_forward(y2, a2, later, B, T, C, NH);
    CHECK(memcmp(y1, y2, (T - 1) * C * sizeof(float)) == 0);

    float d1[B * T * 3 * C], d2[B * T * 3 * C], scratch[T * T];
    kd_attention_forward(y1, a1, qkv, B, T, C, NH);
    kd_attention_backward(d1, scratch, dy, qkv, a1, B, T, C, NH);
    kd_attention_backward_naive(d2, dy, qkv, a1, B, T, C, NH);
    CHECK(max_rel(d1, d2, sizeof d1 / 4) < 1e-4);
    double fd[B * T * 3 * C];
    struct att_ctx ctx = {B, T, C, NH, a2};
    fd_grad(att_fwd, &ctx, qkv, B * T * 3 * C, dy, B * T * C, 1e-2f, fd);
    CHECK(close_to_fd(d1, fd, B * T * 3 * C, 3e-3));
}

/* ---- the model ------------------------------------------------------------------------------ */

static kd_gpt_t *tiny(int V, float dropout, uint64_t seed) {
    kd_gpt_config_t cfg = {
        .layers = 2, .width = 8, .heads = 2, .context = 6, .vocab = V, .dropout = dropout};
    char err[KD_ERR_LEN];
    kd_gpt_t *m = NULL;
    if (kd_gpt_new(&cfg, &m, err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    /* larger than GPT-2's 0.02, so every gradient is well above the float noise of the FD */
    fill(m->params, m->n_params, seed, 0.4f);
    for (int i = 0; i < m->n_tensors; i++)
        if (strstr(m->tensors[i].name, "ln_") && strstr(m->tensors[i].name, "weight"))
            for (size_t j = 0; j < m->tensors[i].count; j++)
                m->params[m->tensors[i].offset + j] += 1.0f;
    return m;
}

static double loss_of(kd_gpt_t *m, const uint32_t *tok, const int32_t *tgt, int B, int T,
                      bool train) {
    kd_gpt_forward(m, tok, B, T, train, 77);
    return kd_gpt_loss(m, tgt, false, NULL);
}

/* d loss / d params[at]: central differences at h and h/2, Richardson-extrapolated (the h^2
 * error cancels, so h can stay well above the float noise of the loss). */
static double fd_param(kd_gpt_t *m, size_t at, const uint32_t *tok, const int32_t *tgt, int B,
                       int T, bool train) {
    float *p = &m->params[at], keep = *p;
    double d[2];
    for (int k = 0; k < 2; k++) {
        float h = k == 0 ? 2e-2f : 1e-2f;
        *p = keep + h;
        double up = loss_of(m, tok, tgt, B, T, train);
        *p = keep - h;
        double down = loss_of(m, tok, tgt, B, T, train);
        d[k] = (up - down) / (2.0 * h);
    }
    *p = keep;
    return (4.0 * d[1] - d[0]) / 3.0;
}

static void check_model_grads(float dropout) {
    enum { B = 2, T = 6, V = 13 };
    kd_gpt_t *m = tiny(V, dropout, 11);
    uint32_t tok[B * T];
    int32_t tgt[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = (uint32_t)(i * 7 % V), tgt[i] = (i * 5 + 3) % V;
    tgt[4] = -1; /* ignored */
    const bool train = dropout > 0;
    kd_gpt_forward(m, tok, B, T, train, 77);
    double loss = kd_gpt_loss(m, tgt, true, NULL);
    kd_gpt_backward(m);
    CHECK(isfinite(loss) && loss > 0);
    float *g = kd_xmalloc(m->n_params * sizeof(float));
    memcpy(g, m->grads, m->n_params * sizeof(float));
    /* every tensor: its first, middle and last entries, by central differences in float */
    int bad = 0, checked = 0;
    for (int t = 0; t < m->n_tensors; t++) {
        const kd_gpt_tensor_t *x = &m->tensors[t];
        size_t at[3] = {x->offset, x->offset + x->count / 2, x->offset + x->count - 1};
        for (int k = 0; k < 3; k++) {
            double fd = fd_param(m, at[k], tok, tgt, B, T, train);
            checked++;
            if (fabs(fd - g[at[k]]) > 2e-3 * fmax(0.05, fabs(fd))) {
                bad++;
                fprintf(stderr, "  %s[%zu]: analytic %.6g, finite differences %.6g\n", x->name,
                        at[k] - x->offset, (double)g[at[k]], fd);
            }
        }
    }
    fprintf(stderr, "  gradients (dropout %.1f): %d of %d entries agree with finite differences\n",
            (double)dropout, checked - bad, checked);
    CHECK(bad == 0);
    /* the unused position embedding (T = context here: none) and an ignored target: the
     * position-4 target contributes nothing, so changing it changes nothing */
    tgt[4] = 0;
    double with = loss_of(m, tok, tgt, B, T, train);
    CHECK(fabs(with - loss) > 1e-7); /* counted now */
    free(g);
    kd_gpt_destroy(&m);
}

/* The chunked head and loss against a dense computation from the logits, with a vocabulary big
 * enough that the head takes several chunks. */
static void test_chunked_head(void) {
    enum { V = 70000, B = 12, T = 6 };
    kd_gpt_t *m = tiny(V, 0, 12);
    CHECK(kd_gpt_head_chunk(V) < (size_t)(B * T)); /* several chunks */
    uint32_t tok[B * T];
    int32_t tgt[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = (uint32_t)(i * 6007 % V), tgt[i] = (i * 5003 + 1) % V;
    kd_gpt_forward(m, tok, B, T, false, 0);
    float *logits = kd_xmalloc((size_t)B * T * V * sizeof(float));
    kd_gpt_logits(m, logits);
    /* one position right: its target is its top logit */
    tgt[5] = 0;
    for (int j = 1; j < V; j++)
        if (logits[5 * (size_t)V + j] > logits[5 * (size_t)V + tgt[5]]) tgt[5] = j;
    double dense = 0;
    size_t dense_correct = 0, correct = 0;
    for (int i = 0; i < B * T; i++) {
        const float *row = logits + (size_t)i * V;
        int top = 0;
        for (int j = 1; j < V; j++)
            if (row[j] > row[top]) top = j;
        double z = 0;
        for (int j = 0; j < V; j++) z += exp((double)row[j] - row[top]);
        dense += row[top] + log(z) - row[tgt[i]];
        dense_correct += top == tgt[i];
    }
    dense /= B * T;
    double chunked = kd_gpt_loss(m, tgt, true, &correct);
    CHECK_CLOSE(chunked, dense, 1e-6);
    CHECK(correct == dense_correct && correct >= 1);
    kd_gpt_backward(m);
    /* d loss / d wte[target of position 0] by finite differences */
    const kd_gpt_tensor_t *wte = kd_gpt_find(m, "wte.weight");
    size_t at = wte->offset + (size_t)tgt[0] * 8 + 3;
    double fd = fd_param(m, at, tok, tgt, B, T, false), g = m->grads[at];
    CHECK(fabs(fd - g) < 2e-3 * fmax(0.05, fabs(g)));
    free(logits);
    kd_gpt_destroy(&m);
}

static void test_determinism_and_shapes(void) {
    kd_gpt_t *a = tiny(17, 0.1f, 3), *b = tiny(17, 0.1f, 3);
    uint32_t tok[12];
    int32_t tgt[12];
    for (int i = 0; i < 12; i++) tok[i] = (uint32_t)(i % 17), tgt[i] = (i + 1) % 17;
    kd_gpt_forward(a, tok, 2, 6, true, 5);
    double la = kd_gpt_loss(a, tgt, true, NULL);
    kd_gpt_backward(a);
    kd_gpt_forward(b, tok, 2, 6, true, 5);
    double lb = kd_gpt_loss(b, tgt, true, NULL);
    kd_gpt_backward(b);
    CHECK(la == lb && memcmp(a->grads, b->grads, a->n_params * sizeof(float)) == 0);
    kd_gpt_forward(b, tok, 2, 6, true, 6); /* another key: other masks */
    CHECK(kd_gpt_loss(b, tgt, false, NULL) != la);
    kd_gpt_forward(b, tok, 2, 6, false, 6); /* eval: no dropout, key irrelevant */
    double e1 = kd_gpt_loss(b, tgt, false, NULL);
    kd_gpt_forward(b, tok, 2, 6, false, 9);
    CHECK(kd_gpt_loss(b, tgt, false, NULL) == e1);
    /* a shorter window after a longer one, and a window's prefix gives the same logits */
    float full[12 * 17], part[6 * 17];
    kd_gpt_forward(b, tok, 1, 6, false, 0);
    kd_gpt_logits(b, full);
    kd_gpt_forward(b, tok, 1, 3, false, 0);
    kd_gpt_logits(b, part);
    CHECK(max_rel(full, part, 3 * 17) < 1e-4); /* other GEMM shapes: other rounding */

    /* the table: Hugging Face names in state_dict order, 2-D weights decayed */
    CHECK(strcmp(a->tensors[0].name, "wte.weight") == 0 && a->tensors[0].decay);
    CHECK(strcmp(a->tensors[2].name, "h.0.ln_1.weight") == 0 && !a->tensors[2].decay);
    const kd_gpt_tensor_t *attn = kd_gpt_find(a, "h.1.attn.c_attn.weight");
    CHECK(attn && attn->ndim == 2 && attn->shape[0] == 8 && attn->shape[1] == 24 && attn->decay);
    CHECK(strcmp(a->tensors[a->n_tensors - 1].name, "ln_f.bias") == 0);
    size_t sum = 0;
    for (int i = 0; i < a->n_tensors; i++) sum += a->tensors[i].count;
    /* closed form: V C + ctx C + L (12 C^2 + 13 C) + 2 C */
    CHECK(sum == a->n_params &&
          a->n_params == (size_t)(17 * 8 + 6 * 8 + 2 * (12 * 64 + 13 * 8) + 16));

    char err[KD_ERR_LEN];
    kd_gpt_t *bad = NULL;
    kd_gpt_config_t cfg = {.layers = 2, .width = 10, .heads = 4, .context = 8, .vocab = 9};
    CHECK(kd_gpt_new(&cfg, &bad, err, sizeof err) == -1 && !bad);
    CHECK_ERR_HAS(err, "width 10 is not a multiple of heads 4");
    kd_gpt_destroy(&a);
    kd_gpt_destroy(&b);
}

/* The KV cache gives the logits of a full forward, position by position; picking follows the
 * softmax, greedy is the argmax, top-k keeps only the k largest. */
static void test_sampler(void) {
    kd_gpt_t *m = tiny(17, 0, 21);
    uint32_t tok[6] = {3, 9, 1, 16, 0, 5};
    float full[6 * 17];
    kd_gpt_forward(m, tok, 1, 6, false, 0);
    kd_gpt_logits(m, full);
    kd_gpt_sampler_t *s = kd_gpt_sampler_new(m);
    double worst = 0;
    for (int t = 0; t < 6; t++)
        worst = fmax(worst, max_rel(kd_gpt_sampler_step(s, tok[t]), full + t * 17, 17));
    CHECK(worst < 1e-4 && kd_gpt_sampler_position(s) == 6);
    kd_gpt_sampler_reset(s);
    CHECK(max_rel(kd_gpt_sampler_step(s, tok[0]), full, 17) < 1e-4);
    kd_gpt_sampler_destroy(&s);
    kd_gpt_destroy(&m);

    const float logits[4] = {1.0f, 2.0f, 0.5f, 2.0f - logf(2.0f)};
    float scratch[4];
    kd_rng_t rng;
    kd_rng_init(&rng, 7);
    CHECK(kd_gpt_pick(logits, 4, 0.0f, 0, &rng, scratch) == 1);
    CHECK(kd_gpt_pick(logits, 4, 1.0f, 1, &rng, scratch) == 1);
    int counts[4] = {0};
    const int draws = 40000;
    for (int i = 0; i < draws; i++) counts[kd_gpt_pick(logits, 4, 1.0f, 0, &rng, scratch)]++;
    double z = 0;
    for (int j = 0; j < 4; j++) z += exp(logits[j]);
    bool follows = true;
    for (int j = 0; j < 4; j++) /* 5 standard deviations of a binomial frequency */
        follows =
            follows && fabs(counts[j] / (double)draws - exp(logits[j]) / z) < 5 * 0.5 / sqrt(draws);
    CHECK(follows);
    memset(counts, 0, sizeof counts);
    for (int i = 0; i < 2000; i++) counts[kd_gpt_pick(logits, 4, 1.0f, 2, &rng, scratch)]++;
    CHECK(counts[0] == 0 && counts[2] == 0 && counts[1] > counts[3] && counts[3] > 0);
    kd_rng_t a, b; /* a seed decides the draws */
    kd_rng_init(&a, 99);
    kd_rng_init(&b, 99);
    bool same = true;
    for (int i = 0; i < 100; i++)
        same = same && kd_gpt_pick(logits, 4, 0.8f, 3, &a, scratch) ==
                           kd_gpt_pick(logits, 4, 0.8f, 3, &b, scratch);
    CHECK(same);
}

int main(void) {
    test_sampler();
    double t0 = kd_now();
    test_conv1d();
    test_layernorm();
    test_gelu_tanh();
    test_attention();
    check_model_grads(0.0f);
    check_model_grads(0.2f);
    test_chunked_head();
    test_determinism_and_shapes();
    fprintf(stderr, "test_gpt: %.2f s\n", kd_now() - t0);
    return kd_test_done("test_gpt");
}
