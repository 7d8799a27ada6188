/* test_loss: cross-entropy and the four distillation divergences — analytic gradients against
 * central finite differences, closed-form values, stability at extreme logits and
 * temperatures, the divergences' symmetry properties, and the accumulated statistics. */
#include <math.h>
#include <stdint.h>

#include "kd_loss.h"
#include "kd_test.h"
#include "kd_util.h"

static const kd_divergence_t DIVS[] = {KD_DIV_FORWARD_KL, KD_DIV_REVERSE_KL, KD_DIV_SYMMETRIC_KL,
                                       KD_DIV_JS};

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static double uniform(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}
static void fill(float *x, int n, double scale) {
    for (int i = 0; i < n; i++) x[i] = (float)(scale * (2.0 * uniform() - 1.0));
}

static kd_loss_config_t config(kd_divergence_t d, float T, float alpha) {
    kd_loss_config_t c = {.divergence = d, .temperature = T, .alpha = alpha};
    return c;
}

/* Mean loss in double, through the stats sums, so finite differences are not limited by the
 * float return value. */
static double mean_loss(const kd_loss_config_t *c, const float *s, const float *t, const int32_t *y,
                        int B, int C) {
    kd_loss_stats_t st = {0};
    kd_loss(c, s, t, y, B, C, NULL, &st);
    return st.loss_sum / B;
}

/* Every analytic gradient entry against a central difference. */
static void check_fd(const kd_loss_config_t *c, float *s, const float *t, const int32_t *y, int B,
                     int C, double h) {
    float *ds = kd_alloc_floats((size_t)B * C);
    float ret = kd_loss(c, s, t, y, B, C, ds, NULL);
    CHECK(isfinite(ret));
    CHECK_CLOSE(ret, mean_loss(c, s, t, y, B, C), 1e-6);
    int bad = 0;
    for (int i = 0; i < B * C; i++) {
        float x0 = s[i];
        s[i] = x0 + (float)h;
        double hp = (double)s[i] - x0;
        double lp = mean_loss(c, s, t, y, B, C);
        s[i] = x0 - (float)h;
        double hm = x0 - (double)s[i];
        double lm = mean_loss(c, s, t, y, B, C);
        s[i] = x0;
        double fd = (lp - lm) / (hp + hm);
        double tol = 1e-5 + 2e-3 * fabs(fd);
        if (!(fabs(fd - ds[i]) <= tol)) {
            if (bad++ < 5)
                fprintf(stderr, "  fd mismatch div=%d T=%g alpha=%g B=%d C=%d i=%d: %.9g vs %.9g\n",
                        (int)c->divergence, (double)c->temperature, (double)c->alpha, B, C, i,
                        (double)ds[i], fd);
        }
    }
    CHECK(bad == 0);
    /* softmax shift invariance: each gradient row sums to zero */
    for (int b = 0; b < B; b++) {
        double sum = 0.0;
        for (int j = 0; j < C; j++) sum += ds[b * C + j];
        CHECK(fabs(sum) < 1e-6);
    }
    free(ds);
}

static void test_finite_differences(void) {
    struct {
        int B, C;
        float T;
        double scale, h;
    } cases[] = {
        {4, 10, 1.0f, 3.0, 1e-3},   /* ordinary logits */
        {3, 10, 4.0f, 5.0, 1e-3},   /* moderate temperature */
        {2, 3, 20.0f, 80.0, 1e-2},  /* logits of +-80 at T = 20 */
        {3, 10, 20.0f, 80.0, 1e-2}, /* same with C = 10 */
        {2, 3, 1.0f, 80.0, 1e-3},   /* +-80 at T = 1: saturated softmax */
        {1, 3, 2.0f, 2.0, 1e-3},
    };
    const float alphas[] = {0.0f, 0.5f, 0.9f, 1.0f};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int B = cases[k].B, C = cases[k].C;
        float *s = kd_alloc_floats((size_t)B * C), *t = kd_alloc_floats((size_t)B * C);
        int32_t y[8];
        fill(s, B * C, cases[k].scale);
        fill(t, B * C, cases[k].scale);
        for (int b = 0; b < B; b++) y[b] = (int32_t)(uniform() * C);
        for (int d = 0; d < 4; d++) {
            for (int a = 0; a < 4; a++) {
                kd_loss_config_t c = config(DIVS[d], cases[k].T, alphas[a]);
                check_fd(&c, s, t, y, B, C, cases[k].h);
            }
        }
        /* alpha = 0 needs no teacher */
        kd_loss_config_t c = config(KD_DIV_FORWARD_KL, cases[k].T, 0.0f);
        check_fd(&c, s, NULL, y, B, C, cases[k].h);
        free(s);
        free(t);
    }
    /* A vocabulary above the stack scratch size takes the heap path. */
    int B = 2, C = 700;
    float *s = kd_alloc_floats((size_t)B * C), *t = kd_alloc_floats((size_t)B * C);
    int32_t y[2] = {3, 699};
    fill(s, B * C, 4.0);
    fill(t, B * C, 4.0);
    for (int d = 0; d < 4; d++) {
        kd_loss_config_t c = config(DIVS[d], 3.0f, 0.7f);
        float *ds = kd_alloc_floats((size_t)B * C);
        kd_loss(&c, s, t, y, B, C, ds, NULL);
        const int probe[] = {0, 3, 350, 699, 700, 1399};
        for (int p = 0; p < 6; p++) {
            int i = probe[p];
            float x0 = s[i];
            s[i] = x0 + 1e-3f;
            double h2 = (double)s[i];
            double lp = mean_loss(&c, s, t, y, B, C);
            s[i] = x0 - 1e-3f;
            h2 -= (double)s[i]; /* the step actually taken, after float rounding */
            double lm = mean_loss(&c, s, t, y, B, C);
            s[i] = x0;
            CHECK_CLOSE(ds[i], (lp - lm) / h2, 1e-6);
        }
        free(ds);
    }
    free(s);
    free(t);
}

static void test_closed_forms(void) {
    /* Identical teacher and student: every divergence and its gradient vanish. */
    float s[2 * 10];
    int32_t y[2] = {1, 7};
    fill(s, 20, 80.0);
    for (int d = 0; d < 4; d++) {
        for (int k = 0; k < 2; k++) {
            float T = k ? 20.0f : 1.0f;
            kd_loss_config_t c = config(DIVS[d], T, 1.0f);
            float ds[20];
            kd_loss_stats_t st = {0};
            float l = kd_loss(&c, s, s, y, 2, 10, ds, &st);
            CHECK(fabs(l) < 1e-6);
            CHECK(fabs(st.kd_sum) < 1e-6);
            for (int i = 0; i < 20; i++) CHECK(fabs(ds[i]) < 1e-7);
        }
    }

    /* Two classes by hand: T = 2, teacher t/T = (ln 3, 0) -> p = (3/4, 1/4); student s = 0
     * -> q = (1/2, 1/2). */
    float t2[2] = {(float)(2.0 * log(3.0)), 0.0f}, s2[2] = {0.0f, 0.0f};
    int32_t y2[1] = {0};
    double fwd = 0.75 * log(0.75 / 0.5) + 0.25 * log(0.25 / 0.5);
    double rev = 0.5 * log(0.5 / 0.75) + 0.5 * log(0.5 / 0.25);
    double js = 0.5 * (0.75 * log(0.75 / 0.625) + 0.25 * log(0.25 / 0.375) +
                       0.5 * log(0.5 / 0.625) + 0.5 * log(0.5 / 0.375));
    const double want[4] = {fwd, rev, 0.5 * (fwd + rev), js};
    for (int d = 0; d < 4; d++) {
        kd_loss_config_t c = config(DIVS[d], 2.0f, 1.0f);
        float ds[2];
        CHECK_CLOSE(kd_loss(&c, s2, t2, y2, 1, 2, ds, NULL), 4.0 * want[d], 1e-6);
        /* mixed with CE = ln 2 at alpha = 0.25 */
        c.alpha = 0.25f;
        CHECK_CLOSE(kd_loss(&c, s2, t2, y2, 1, 2, NULL, NULL),
                    0.25 * 4.0 * want[d] + 0.75 * log(2.0), 1e-6);
    }
    /* forward KL gradient: alpha * T * (q - p) = 2 * (-1/4, 1/4) */
    kd_loss_config_t c = config(KD_DIV_FORWARD_KL, 2.0f, 1.0f);
    float ds2[2];
    kd_loss(&c, s2, t2, y2, 1, 2, ds2, NULL);
    CHECK_CLOSE(ds2[0], -0.5, 1e-6);
    CHECK_CLOSE(ds2[1], 0.5, 1e-6);

    /* CE of uniform logits is ln C; gradient (1/C - onehot) / B. */
    const int Cs[] = {3, 10};
    for (int k = 0; k < 2; k++) {
        int C = Cs[k], B = 4;
        float z[40] = {0}, dz[40];
        for (int i = 0; i < B * C; i++) z[i] = 5.0f; /* a common shift changes nothing */
        int32_t yy[4] = {0, 1, 2, 1};
        kd_loss_config_t ce = config(KD_DIV_FORWARD_KL, 1.0f, 0.0f);
        CHECK_CLOSE(kd_loss(&ce, z, NULL, yy, B, C, dz, NULL), log((double)C), 1e-6);
        for (int b = 0; b < B; b++)
            for (int j = 0; j < C; j++)
                CHECK_CLOSE(dz[b * C + j], (1.0 / C - (j == yy[b])) / B, 1e-7);
    }

    /* The batch loss is the mean of the per-sample losses. */
    float sb[3 * 10], tb[3 * 10];
    int32_t yb[3] = {2, 5, 9};
    fill(sb, 30, 4.0);
    fill(tb, 30, 4.0);
    for (int d = 0; d < 4; d++) {
        kd_loss_config_t cb = config(DIVS[d], 3.0f, 0.6f);
        double sum = 0.0;
        for (int b = 0; b < 3; b++)
            sum += kd_loss(&cb, sb + 10 * b, tb + 10 * b, yb + b, 1, 10, NULL, NULL);
        CHECK_CLOSE(kd_loss(&cb, sb, tb, yb, 3, 10, NULL, NULL), sum / 3.0, 1e-6);
    }
}

static void test_stability(void) {
    /* Disjoint, fully confident distributions at T = 1: logits 100 on different classes. */
    float t[3] = {100.0f, -100.0f, -100.0f}, s[3] = {-100.0f, 100.0f, -100.0f};
    int32_t y[1] = {0};
    float ds[3];
    const double want[4] = {200.0, 200.0, 200.0, M_LN2}; /* KL ~ 200 nats; JS -> ln 2 */
    for (int d = 0; d < 4; d++) {
        kd_loss_config_t c = config(DIVS[d], 1.0f, 1.0f);
        float l = kd_loss(&c, s, t, y, 1, 3, ds, NULL);
        CHECK_CLOSE(l, want[d], 1e-5);
        for (int j = 0; j < 3; j++) CHECK(isfinite(ds[j]));
    }
    /* Beyond float-softmax range (+-1000): probabilities underflow even in double, and the
     * log-space paths must still give KL = 2000 nats and JS = ln 2. */
    float tb[3] = {1000.0f, -1000.0f, -1000.0f}, sb[3] = {-1000.0f, 1000.0f, -1000.0f};
    const double want_big[4] = {2000.0, 2000.0, 2000.0, M_LN2};
    for (int d = 0; d < 4; d++) {
        kd_loss_config_t c = config(DIVS[d], 1.0f, 1.0f);
        CHECK_CLOSE(kd_loss(&c, sb, tb, y, 1, 3, ds, NULL), want_big[d], 1e-5);
        for (int j = 0; j < 3; j++) CHECK(isfinite(ds[j]));
    }
    /* CE with the true class at -200 below the winner: 200 nats, finite. */
    kd_loss_config_t ce = config(KD_DIV_FORWARD_KL, 1.0f, 0.0f);
    CHECK_CLOSE(kd_loss(&ce, s, NULL, y, 1, 3, ds, NULL), 200.0, 1e-5);
    CHECK_CLOSE(ds[0], -1.0, 1e-6);
    CHECK_CLOSE(ds[1], 1.0, 1e-6);

    /* Random +-100 logits at several temperatures: everything finite and non-negative. */
    enum { B = 16, C = 10 };
    float sl[B * C], tl[B * C], dl[B * C];
    int32_t yl[B];
    for (int r = 0; r < 20; r++) {
        for (int i = 0; i < B * C; i++) {
            sl[i] = uniform() < 0.5 ? -100.0f : 100.0f;
            tl[i] = (float)(200.0 * uniform() - 100.0);
        }
        for (int b = 0; b < B; b++) yl[b] = (int32_t)(uniform() * C);
        const float Ts[] = {1.0f, 2.5f, 20.0f};
        for (int d = 0; d < 4; d++) {
            for (int k = 0; k < 3; k++) {
                kd_loss_config_t c = config(DIVS[d], Ts[k], 0.5f);
                kd_loss_stats_t st = {0};
                float l = kd_loss(&c, sl, tl, yl, B, C, dl, &st);
                CHECK(isfinite(l) && l >= 0.0f);
                CHECK(st.kd_sum >= 0.0 && isfinite(st.kd_sum));
                int finite = 1;
                for (int i = 0; i < B * C; i++) finite &= isfinite(dl[i]) != 0;
                CHECK(finite);
            }
        }
    }

    /* log-softmax: naive double reference on moderate inputs, finite at the extremes. */
    float x[2 * 4] = {1.0f, 2.0f, -3.0f, 0.5f, 100.0f, -100.0f, 100.0f, 0.0f}, out[8];
    kd_log_softmax(x, out, 2, 4, 2.0f);
    double z = 0.0;
    for (int j = 0; j < 4; j++) z += exp(x[j] / 2.0);
    for (int j = 0; j < 4; j++) CHECK_CLOSE(out[j], x[j] / 2.0 - log(z), 1e-6);
    CHECK_CLOSE(out[4], -log(2.0), 1e-6);
    CHECK_CLOSE(out[5], -100.0 - log(2.0), 1e-6);
    CHECK(isfinite(out[7]));
    double total = 0.0;
    for (int j = 4; j < 8; j++) total += exp(out[j]);
    CHECK_CLOSE(total, 1.0, 1e-6);
}

static double div_value(kd_divergence_t d, float T, const float *s, const float *t, int C) {
    int32_t y[1] = {0};
    kd_loss_config_t c = config(d, T, 1.0f);
    kd_loss_stats_t st = {0};
    kd_loss(&c, s, t, y, 1, C, NULL, &st);
    return st.kd_sum;
}

static void test_properties(void) {
    float a[10], b[10];
    for (int r = 0; r < 50; r++) {
        double scale = r < 25 ? 3.0 : 60.0;
        fill(a, 10, scale);
        fill(b, 10, scale);
        float T = r % 3 == 0 ? 1.0f : (r % 3 == 1 ? 4.0f : 20.0f);
        double fwd = div_value(KD_DIV_FORWARD_KL, T, a, b, 10);
        double rev = div_value(KD_DIV_REVERSE_KL, T, a, b, 10);
        double fwd_swapped = div_value(KD_DIV_FORWARD_KL, T, b, a, 10);
        double sym = div_value(KD_DIV_SYMMETRIC_KL, T, a, b, 10);
        double js = div_value(KD_DIV_JS, T, a, b, 10);
        double js_swapped = div_value(KD_DIV_JS, T, b, a, 10);
        CHECK(fwd >= 0.0 && rev >= 0.0 && js >= 0.0);
        CHECK_CLOSE(rev, fwd_swapped, 1e-9); /* KL(q||p) is forward KL with roles swapped */
        CHECK_CLOSE(sym, 0.5 * (fwd + rev), 1e-9);
        CHECK_CLOSE(js, js_swapped, 1e-9);                    /* JS is symmetric */
        CHECK(js <= M_LN2 * T * T * (1 + 1e-9));              /* and bounded by ln 2 (times T^2) */
        CHECK(js <= 0.25 * (fwd + rev) * (1 + 1e-9) + 1e-12); /* JS <= sym KL / 2 (convexity) */
    }
}

static void test_stats(void) {
    enum { B = 4, C = 3 };
    /* argmax student: 0, 2, 1, 1 ; teacher: 0, 1, 1, 2 ; labels: 0, 2, 0, 1 */
    const float s[B * C] = {5, 1, 0, 0, 1, 3, 0, 2, 1, 1, 4, 0};
    const float t[B * C] = {2, 0, 0, 0, 3, 1, 1, 5, 0, 0, 1, 2};
    const int32_t y[B] = {0, 2, 0, 1};
    kd_loss_config_t c = config(KD_DIV_FORWARD_KL, 2.0f, 0.5f);
    kd_loss_stats_t st = {0};
    float l1 = kd_loss(&c, s, t, y, B, C, NULL, &st);
    CHECK(st.count == 4 && st.correct == 3 && st.agree == 2);
    CHECK_CLOSE(st.loss_sum, 4.0 * l1, 1e-6);
    CHECK_CLOSE(st.loss_sum, 0.5 * st.kd_sum + 0.5 * st.ce_sum, 1e-9);
    /* accumulation across calls; the first two rows only */
    float l2 = kd_loss(&c, s, t, y, 2, C, NULL, &st);
    CHECK(st.count == 6 && st.correct == 5 && st.agree == 3);
    CHECK_CLOSE(st.loss_sum, 4.0 * l1 + 2.0 * l2, 1e-6);
    /* CE sum by hand for row 0: -log softmax(5,1,0)[0] */
    kd_loss_stats_t one = {0};
    kd_loss(&c, s, t, y, 1, C, NULL, &one);
    CHECK_CLOSE(one.ce_sum, -(5.0 - log(exp(5.0) + exp(1.0) + exp(0.0))), 1e-9);
    /* Without a teacher there is no divergence and no agreement. */
    kd_loss_config_t sup = config(KD_DIV_FORWARD_KL, 2.0f, 0.0f);
    kd_loss_stats_t st0 = {0};
    float l0 = kd_loss(&sup, s, NULL, y, B, C, NULL, &st0);
    CHECK(st0.count == 4 && st0.correct == 3 && st0.agree == 0 && st0.kd_sum == 0.0);
    CHECK_CLOSE(l0, st0.ce_sum / 4.0, 1e-6);
    kd_loss(&sup, s, NULL, y, B, C, NULL, NULL); /* stats may be NULL */
    /* Ties go to the first maximum, as torch.argmax does. */
    const float tie[3] = {1, 1, 0};
    const int32_t y_first[1] = {0}, y_second[1] = {1};
    kd_loss_stats_t st_tie = {0};
    kd_loss(&sup, tie, NULL, y_first, 1, 3, NULL, &st_tie);
    kd_loss(&sup, tie, NULL, y_second, 1, 3, NULL, &st_tie);
    CHECK(st_tie.correct == 1 && st_tie.count == 2);
}

int main(void) {
    test_finite_differences();
    test_closed_forms();
    test_stability();
    test_properties();
    test_stats();
    return kd_test_done("test_loss");
}
