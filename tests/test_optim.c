/* test_optim: optimizers against hand-written reference loops and against PyTorch values,
 * clipping against its closed form, and every learning-rate schedule against torch's
 * schedulers (reference constants from tests/data/make_optim_reference.py). */
#include <math.h>

#include "kd_optim.h"
#include "kd_test.h"
#include "kd_util.h"

/* Relative closeness, for learning rates that can be far below 1. */
#define CHECK_REL(a, b, rel)                                                                       \
    do {                                                                                           \
        double ra_ = (double)(a), rb_ = (double)(b);                                               \
        kd_test_checks++;                                                                          \
        if (!(fabs(ra_ - rb_) <= (rel)*fabs(rb_))) {                                               \
            kd_test_failures++;                                                                    \
            fprintf(stderr, "%s:%d: CHECK_REL failed: %s = %.12g, %s = %.12g (rel %g)\n",          \
                    __FILE__, __LINE__, #a, ra_, #b, rb_, (double)(rel));                          \
        }                                                                                          \
    } while (0)

/* ---- reference values printed by /usr/bin/python3 tests/data/make_optim_reference.py
 *      (PyTorch 1.13); do not edit by hand, rerun the script. ---- */
// clang-format off
static const double ONECYCLE_100[100] = {
    0.0040000000000000036, 0.0042813780565907483, 0.0051222133259158503, 0.0065126477832254809, 0.0084363798557940683, 0.010870855543955726, 0.013787532846129102, 0.017152216387689725, 0.020925458330472269, 0.025063020862605645, 0.029516394846410082, 0.034233368543684112, 0.039158639750597392, 0.044234464165467287, 0.049401332387899961, 0.054598667612100041, 0.059765535834532708, 0.064841360249402596, 0.069766631456315897, 0.074483605153589927, 0.07893697913739435, 0.083074541669527727, 0.08684778361231027, 0.090212467153870907, 0.093129144456044283, 0.095563620144205941, 0.097487352216774514, 0.098877786674084159, 0.099718621943409261, 0.10000000000000001, 0.099949653528452434, 0.099798715504903171, 0.099547489898444391, 0.099196482644013775, 0.098746400623508743, 0.098198150242220533, 0.09755283560345443, 0.096811756285012734, 0.09597640472201803, 0.095048463201347383, 0.094029800473730538, 0.092922467990334587, 0.09172869577141439, 0.090450887915348499, 0.089091617757105002, 0.087653622685887361, 0.086139798632396819, 0.084553194236813442, 0.082897004709240454, 0.081174565394976306, 0.079389345057573196, 0.077544938893208834, 0.075645061290439838, 0.073693538349917445, 0.071694300179130088, 0.069651372977689849, 0.067568870929102326, 0.065450987915348494, 0.06330198907096464, 0.06112620219362893, 0.058928009028552879, 0.056711836444229613, 0.054482147517309898, 0.052243432544559681, 0.050000200000000002, 0.047756967455440343, 0.045518252482690112, 0.043288563555770404, 0.041072390971447131, 0.038874197806371073, 0.036698410929035363, 0.03454941208465151, 0.032431529070897677, 0.030349027022310158, 0.028306099820869922, 0.026306861650082565, 0.024355338709560182, 0.022455461106791173, 0.02061105494242681, 0.018825834605023701, 0.017103395290759563, 0.015447205763186566, 0.013860601367603195, 0.012346777314112658, 0.010908782242895003, 0.0095495120846515076, 0.0082717042285856118, 0.0070779320096654164, 0.0059705995262694716, 0.0049519367986526289, 0.0040239952779819819, 0.0031886437149872679, 0.0024475643965455826, 0.0018022497577794773, 0.0012539993764912555, 0.00080391735598623639, 0.00045291010155561862, 0.00020168449509684564, 5.0746471547578801e-05, 3.9999999999999998e-07};
static const double ONECYCLE_7[7] = {
    0.0049999999999999975, 0.049088591906326189, 0.045956250419673723, 0.033650492234172165, 0.017918923523889969, 0.0050096947938477916, 5.0000000000000002e-05};
static const double ONECYCLE_2[2] = {
    0.1500002, 7.9999999999999996e-07};
static const double COSINE_10[11] = {
    0.10000000000000001, 0.097577297556610113, 0.090546341221559898, 0.079595369988477424, 0.065796341221559904, 0.050500000000000003, 0.03520365877844011, 0.021404630011522589, 0.010453658778440109, 0.0034227024433899004, 0.001};
static const double STEPLR_3[10] = {
    0.10000000000000001, 0.10000000000000001, 0.10000000000000001, 0.050000000000000003, 0.050000000000000003, 0.050000000000000003, 0.025000000000000001, 0.025000000000000001, 0.025000000000000001, 0.012500000000000001};
static const float SGD_NESTEROV[4][5] = {
    {0.480952501f, -1.21188128f, 1.94280994f, 0.0759999976f, -0.309471518f},
    {0.529786587f, -1.21451557f, 1.88024437f, -0.00560723199f, -0.294479966f},
    {0.49920857f, -1.25532556f, 1.93684423f, -0.0440497808f, -0.289973527f},
    {0.494164765f, -1.25048995f, 1.86668468f, -0.0316441432f, -0.342903435f},
};
static const float SGD_MOMENTUM_CLIP[4][5] = {
    {0.4909091f, -1.2318182f, 1.9727273f, 0.0363635682f, -0.304545462f},
    {0.503731489f, -1.22245598f, 1.93417907f, 0.0270824358f, -0.301634967f},
    {0.495126069f, -1.23417556f, 1.93977678f, 0.0106712012f, -0.299015522f},
    {0.48738119f, -1.23559451f, 1.90829992f, 0.0141584752f, -0.324044108f},
};
static const float ADAMW[4][5] = {
    {0.489950001f, -1.23987496f, 1.98979998f, 0.00999999978f, -0.309969991f},
    {0.494842917f, -1.23708761f, 1.9798975f, 0.00752198137f, -0.306277961f},
    {0.493826419f, -1.24035537f, 1.98049772f, 0.00474661868f, -0.303417325f},
    {0.492984921f, -1.24123168f, 1.97768295f, 0.00409580767f, -0.308024377f},
};
static const float ADAMW_CLIP[4][5] = {
    {0.447500914f, -1.19375038f, 1.9400003f, 0.0499997772f, -0.348498166f},
    {0.468791604f, -1.17254257f, 1.88433325f, 0.0406199321f, -0.330936283f},
    {0.455803007f, -1.18454087f, 1.88305366f, 0.0287659727f, -0.317818522f},
    {0.4453758f, -1.18110287f, 1.858904f, 0.0306623597f, -0.345889896f},
};
// clang-format on
/* The inputs the script used. */
static const float P0[5] = {0.5f, -1.25f, 2.0f, 0.0f, -0.3f};
static const float GRADS[4][5] = {{0.1f, -0.2f, 0.3f, -0.4f, 0.05f},
                                  {-0.3f, 0.1f, 0.2f, 0.6f, -0.1f},
                                  {0.25f, 0.25f, -0.5f, 0.1f, 0.0f},
                                  {0.0f, -0.1f, 0.4f, -0.2f, 0.3f}};

static kd_optim_config_t sgd_config(float momentum, bool nesterov, float wd, float clip) {
    kd_optim_config_t c = {0};
    c.kind = KD_OPT_SGD;
    c.momentum = momentum;
    c.nesterov = nesterov;
    c.weight_decay = wd;
    c.clip_norm = clip;
    return c;
}

static kd_optim_config_t adamw_config(float b1, float b2, float eps, float wd, float clip) {
    kd_optim_config_t c = {0};
    c.kind = KD_OPT_ADAMW;
    c.beta1 = b1;
    c.beta2 = b2;
    c.eps = eps;
    c.weight_decay = wd;
    c.clip_norm = clip;
    return c;
}

/* Runs the script's four steps and compares the parameters after each against torch. */
static void check_against_torch(const kd_optim_config_t *cfg, float lr, const float want[4][5]) {
    kd_optim_t *opt = kd_optim_new(cfg, 5);
    float p[5], g[5];
    memcpy(p, P0, sizeof p);
    for (int s = 0; s < 4; s++) {
        memcpy(g, GRADS[s], sizeof g);
        kd_optim_step(opt, p, g, lr);
        for (int i = 0; i < 5; i++) CHECK_CLOSE(p[i], want[s][i], 2e-6);
    }
    CHECK(opt->t == 4);
    kd_optim_destroy(&opt);
    CHECK(opt == NULL);
}

static void test_torch_optimizers(void) {
    kd_optim_config_t c = sgd_config(0.9f, true, 5e-4f, 0.0f);
    check_against_torch(&c, 0.1f, SGD_NESTEROV);
    c = sgd_config(0.9f, false, 0.0f, 0.5f);
    check_against_torch(&c, 0.1f, SGD_MOMENTUM_CLIP);
    c = adamw_config(0.9f, 0.999f, 1e-8f, 0.01f, 0.0f);
    check_against_torch(&c, 0.01f, ADAMW);
    c = adamw_config(0.8f, 0.99f, 1e-6f, 0.1f, 0.3f);
    check_against_torch(&c, 0.05f, ADAMW_CLIP);
}

/* A deterministic pseudo-random gradient stream, independent of the optimizer. */
static float grad_at(int step, size_t i) {
    return (float)sin(0.7 * (double)step + 1.3 * (double)i) * (float)(1 + (i % 3));
}

/* Reference SGD written from the torch.optim.SGD documentation, in double. */
static void ref_sgd(double *p, double *buf, size_t n, int steps, double lr, double mu,
                    bool nesterov, double wd, double clip) {
    for (int s = 0; s < steps; s++) {
        double g[16], norm = 0.0;
        for (size_t i = 0; i < n; i++) {
            g[i] = grad_at(s, i);
            norm += g[i] * g[i];
        }
        norm = sqrt(norm);
        if (clip > 0 && clip / (norm + 1e-6) < 1)
            for (size_t i = 0; i < n; i++) g[i] *= clip / (norm + 1e-6);
        for (size_t i = 0; i < n; i++) {
            double d = g[i] + wd * p[i];
            if (mu != 0) {
                buf[i] = s == 0 ? d : mu * buf[i] + d;
                d = nesterov ? d + mu * buf[i] : buf[i];
            }
            p[i] -= lr * d;
        }
    }
}

/* Reference AdamW (Loshchilov & Hutter, torch form), in double. */
static void ref_adamw(double *p, size_t n, int steps, double lr, double b1, double b2, double eps,
                      double wd, double clip) {
    double m[16] = {0}, v[16] = {0};
    for (int s = 0; s < steps; s++) {
        double g[16], norm = 0.0;
        for (size_t i = 0; i < n; i++) {
            g[i] = grad_at(s, i);
            norm += g[i] * g[i];
        }
        norm = sqrt(norm);
        if (clip > 0 && clip / (norm + 1e-6) < 1)
            for (size_t i = 0; i < n; i++) g[i] *= clip / (norm + 1e-6);
        int t = s + 1;
        for (size_t i = 0; i < n; i++) {
            p[i] *= 1 - lr * wd;
            m[i] = b1 * m[i] + (1 - b1) * g[i];
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
            double mh = m[i] / (1 - pow(b1, t)), vh = v[i] / (1 - pow(b2, t));
            p[i] -= lr * mh / (sqrt(vh) + eps);
        }
    }
}

static void run_ours(const kd_optim_config_t *cfg, float *p, size_t n, int steps, float lr) {
    kd_optim_t *opt = kd_optim_new(cfg, n);
    float g[16];
    for (int s = 0; s < steps; s++) {
        double norm = 0.0;
        for (size_t i = 0; i < n; i++) {
            g[i] = grad_at(s, i);
            norm += (double)g[i] * g[i];
        }
        float got = kd_optim_step(opt, p, g, lr);
        CHECK_CLOSE(got, sqrt(norm), 1e-6); /* the pre-clip norm */
    }
    kd_optim_destroy(&opt);
}

static void test_reference_loops(void) {
    enum { N = 11, STEPS = 9 };
    const float mus[] = {0.0f, 0.9f, 0.5f};
    for (int k = 0; k < 3; k++) {
        for (int nest = 0; nest < 2; nest++) {
            for (int variant = 0; variant < 3; variant++) {
                double wd = variant >= 1 ? 1e-2 : 0.0, clip = variant == 2 ? 0.7 : 0.0;
                double rp[N], rbuf[N] = {0};
                float p[N];
                for (int i = 0; i < N; i++) p[i] = (float)(rp[i] = 0.1 * i - 0.4);
                kd_optim_config_t c =
                    sgd_config(mus[k], nest && mus[k] > 0, (float)wd, (float)clip);
                run_ours(&c, p, N, STEPS, 0.05f);
                ref_sgd(rp, rbuf, N, STEPS, 0.05f, mus[k], nest && mus[k] > 0, (float)wd,
                        (float)clip);
                for (int i = 0; i < N; i++) CHECK_CLOSE(p[i], rp[i], 1e-5);
            }
        }
    }
    for (int variant = 0; variant < 3; variant++) {
        double wd = variant >= 1 ? 0.05 : 0.0, clip = variant == 2 ? 1.5 : 0.0;
        double rp[N];
        float p[N];
        for (int i = 0; i < N; i++) p[i] = (float)(rp[i] = 0.3 - 0.07 * i);
        kd_optim_config_t c = adamw_config(0.9f, 0.999f, 1e-8f, (float)wd, (float)clip);
        run_ours(&c, p, N, STEPS, 0.01f);
        ref_adamw(rp, N, STEPS, 0.01f, 0.9f, 0.999f, 1e-8f, (float)wd, (float)clip);
        for (int i = 0; i < N; i++) CHECK_CLOSE(p[i], rp[i], 1e-5);
    }
    /* Plain SGD in one step is exactly p - lr * g. */
    kd_optim_config_t c = sgd_config(0.0f, false, 0.0f, 0.0f);
    kd_optim_t *opt = kd_optim_new(&c, 2);
    CHECK(opt->v == NULL);
    float p[2] = {1.0f, 2.0f}, g[2] = {0.5f, -0.25f};
    kd_optim_step(opt, p, g, 0.5f);
    CHECK(p[0] == 0.75f && p[1] == 2.125f);
    kd_optim_destroy(&opt);
    kd_optim_destroy(&opt); /* NULL-safe */
    kd_optim_destroy(NULL);
}

static void test_clipping(void) {
    /* |(3, 4)| = 5: clipping to 1 scales by 1 / (5 + 1e-6), as clip_grad_norm_ does. */
    kd_optim_config_t c = sgd_config(0.0f, false, 0.0f, 1.0f);
    kd_optim_t *opt = kd_optim_new(&c, 2);
    float p[2] = {0.0f, 0.0f}, g[2] = {3.0f, 4.0f};
    float norm = kd_optim_step(opt, p, g, 1.0f);
    CHECK_CLOSE(norm, 5.0, 1e-7);
    CHECK_CLOSE(g[0], 3.0 / (5.0 + 1e-6), 1e-7);
    CHECK_CLOSE(g[1], 4.0 / (5.0 + 1e-6), 1e-7);
    CHECK_CLOSE(kd_l2_norm(g, 2), 1.0, 1e-6);
    CHECK_CLOSE(p[0], -0.6, 1e-6);
    CHECK_CLOSE(p[1], -0.8, 1e-6);
    /* Below the bound nothing changes. */
    float g2[2] = {0.3f, 0.4f};
    norm = kd_optim_step(opt, p, g2, 1.0f);
    CHECK_CLOSE(norm, 0.5, 1e-7);
    CHECK(g2[0] == 0.3f && g2[1] == 0.4f);
    kd_optim_destroy(&opt);

    /* Norms are accumulated in double: squares of 1e20 overflow float. */
    float big[4] = {1e20f, -1e20f, 1e20f, -1e20f};
    CHECK_CLOSE(kd_l2_norm(big, 4) / 2e20, 1.0, 1e-6);
    /* and many small terms do not lose precision. */
    size_t n = 1000000;
    float *small = kd_alloc_floats(n);
    for (size_t i = 0; i < n; i++) small[i] = 1e-3f;
    CHECK_CLOSE(kd_l2_norm(small, n), 1e-3 * 1000.0, 1e-6);
    free(small);
    CHECK(kd_l2_norm(NULL, 0) == 0.0f);

    /* An empty parameter set is legal. */
    opt = kd_optim_new(&c, 0);
    CHECK(kd_optim_step(opt, NULL, NULL, 0.1f) == 0.0f);
    kd_optim_destroy(&opt);
}

static kd_schedule_config_t sched(kd_sched_kind_t kind, float lr) {
    kd_schedule_config_t s = {0};
    s.kind = kind;
    s.lr = lr;
    return s;
}

static void test_schedules(void) {
    /* constant, with and without warm-up */
    kd_schedule_config_t s = sched(KD_SCHED_CONSTANT, 0.1f);
    CHECK(kd_schedule_lr(&s, 0) == 0.1f && kd_schedule_lr(&s, 1000000) == 0.1f);
    s.warmup_steps = 4;
    CHECK_REL(kd_schedule_lr(&s, 0), 0.025, 1e-6);
    CHECK_REL(kd_schedule_lr(&s, 2), 0.075, 1e-6);
    CHECK_REL(kd_schedule_lr(&s, 3), 0.1, 1e-6);
    CHECK_REL(kd_schedule_lr(&s, 4), 0.1, 1e-6);
    s.warmup_steps = 1;
    CHECK_REL(kd_schedule_lr(&s, 0), 0.1, 1e-6);

    /* step: torch StepLR, then the same shifted by a warm-up */
    s = sched(KD_SCHED_STEP, 0.1f);
    s.step_size = 3;
    s.gamma = 0.5f;
    for (int i = 0; i < 10; i++) CHECK_REL(kd_schedule_lr(&s, i), STEPLR_3[i], 1e-6);
    s.warmup_steps = 5;
    CHECK_REL(kd_schedule_lr(&s, 1), 0.1 * 2 / 5, 1e-6);
    for (int i = 0; i < 10; i++) CHECK_REL(kd_schedule_lr(&s, 5 + i), STEPLR_3[i], 1e-6);
    s.step_size = 0; /* degenerate: no decay rather than a division by zero */
    CHECK_REL(kd_schedule_lr(&s, 100), 0.1, 1e-6);

    /* cosine: torch CosineAnnealingLR(T_max=10, eta_min=1e-3) */
    s = sched(KD_SCHED_COSINE, 0.1f);
    s.total_steps = 10;
    s.min_lr = 0.001f;
    for (int i = 0; i <= 10; i++) CHECK_REL(kd_schedule_lr(&s, i), COSINE_10[i], 1e-6);
    CHECK_REL(kd_schedule_lr(&s, 11), 0.001, 1e-6); /* past the horizon: stays at the floor */
    CHECK_REL(kd_schedule_lr(&s, 500), 0.001, 1e-6);
    /* with a warm-up of 3 the cosine runs over the remaining 10 steps */
    s.total_steps = 13;
    s.warmup_steps = 3;
    CHECK_REL(kd_schedule_lr(&s, 0), 0.1 / 3, 1e-6);
    CHECK_REL(kd_schedule_lr(&s, 2), 0.1, 1e-6);
    for (int i = 0; i <= 10; i++) CHECK_REL(kd_schedule_lr(&s, 3 + i), COSINE_10[i], 1e-6);
    /* closed form at the midpoint, independent of torch */
    CHECK_REL(kd_schedule_lr(&s, 8), 0.001 + (0.1 - 0.001) / 2, 1e-6);
    /* degenerate horizons: no NaN, no division by zero */
    s.total_steps = 3;
    CHECK_REL(kd_schedule_lr(&s, 3), 0.001, 1e-6);
    s.total_steps = 0;
    s.warmup_steps = 0;
    CHECK(isfinite(kd_schedule_lr(&s, 0)));
    s.total_steps = 1;
    CHECK_REL(kd_schedule_lr(&s, 0), 0.1, 1e-6);
    CHECK_REL(kd_schedule_lr(&s, 1), 0.001, 1e-6);

    /* onecycle: torch OneCycleLR */
    s = sched(KD_SCHED_ONECYCLE, 0.1f);
    s.total_steps = 100;
    s.pct_start = 0.3f;
    s.div_factor = 25.0f;
    s.final_div_factor = 1e4f;
    s.warmup_steps = 10; /* ignored: onecycle has its own rise */
    for (int i = 0; i < 100; i++) CHECK_REL(kd_schedule_lr(&s, i), ONECYCLE_100[i], 2e-6);
    CHECK_REL(kd_schedule_lr(&s, 100), ONECYCLE_100[99], 1e-6);
    CHECK_REL(kd_schedule_lr(&s, 100000), ONECYCLE_100[99], 1e-6);
    /* closed-form end points */
    CHECK_REL(kd_schedule_lr(&s, 0), 0.1 / 25, 1e-6);
    CHECK_REL(kd_schedule_lr(&s, 29), 0.1, 1e-6);
    CHECK_REL(kd_schedule_lr(&s, 99), 0.1 / 25 / 1e4, 1e-6);

    s = sched(KD_SCHED_ONECYCLE, 0.05f);
    s.total_steps = 7;
    s.pct_start = 0.3f;
    s.div_factor = 10.0f;
    s.final_div_factor = 100.0f;
    for (int i = 0; i < 7; i++) CHECK_REL(kd_schedule_lr(&s, i), ONECYCLE_7[i], 2e-6);

    s = sched(KD_SCHED_ONECYCLE, 0.2f);
    s.total_steps = 2;
    s.pct_start = 0.25f;
    s.div_factor = 25.0f;
    s.final_div_factor = 1e4f;
    for (int i = 0; i < 2; i++) CHECK_REL(kd_schedule_lr(&s, i), ONECYCLE_2[i], 2e-6);

    /* degenerate one-cycle configs stay finite (torch divides by zero or raises) */
    s.total_steps = 1;
    CHECK_REL(kd_schedule_lr(&s, 0), 0.2 / 25 / 1e4, 1e-6);
    s.total_steps = 0;
    CHECK(isfinite(kd_schedule_lr(&s, 0)) && kd_schedule_lr(&s, 0) >= 0.0f);
    s.total_steps = 2;
    s.pct_start = 0.5f; /* phase one is the single step 0 */
    CHECK_REL(kd_schedule_lr(&s, 0), 0.2, 1e-6);
    s.pct_start = 1.0f; /* no annealing phase */
    for (int i = 0; i < 4; i++) CHECK(isfinite(kd_schedule_lr(&s, i)));
    s.pct_start = 0.0f;
    s.div_factor = 0.0f;
    s.final_div_factor = 0.0f;
    for (int i = 0; i < 4; i++) CHECK(isfinite(kd_schedule_lr(&s, i)));
}

/* Exempt spans: the same update as an optimizer with weight decay 0 over them (a torch param
 * group), the rest as one with decay; adjacent spans merge. */
static void test_decay_exemption(void) {
    enum { N = 12 };
    for (int kind = 0; kind < KD_OPT_COUNT; kind++) {
        kd_optim_config_t with = {.kind = kind,
                                  .momentum = 0.9f,
                                  .weight_decay = 0.5f,
                                  .beta1 = 0.9f,
                                  .beta2 = 0.99f,
                                  .eps = 1e-8f};
        kd_optim_config_t without = with;
        without.weight_decay = 0.0f;
        kd_optim_t *mixed = kd_optim_new(&with, N), *a = kd_optim_new(&with, N),
                   *b = kd_optim_new(&without, N);
        kd_optim_exempt_decay(mixed, 2, 3);
        kd_optim_exempt_decay(mixed, 5, 1); /* adjacent: merged into [2, 6) */
        kd_optim_exempt_decay(mixed, 9, 3); /* up to the end */
        CHECK(mixed->n_no_decay == 2 && mixed->no_decay[0].count == 4);
        float p[N], pa[N], pb[N], g[N];
        for (int i = 0; i < N; i++) p[i] = pa[i] = pb[i] = 1.0f + 0.1f * i;
        for (int step = 0; step < 3; step++) {
            for (int i = 0; i < N; i++) g[i] = 0.3f - 0.05f * i + 0.01f * step;
            float ga[N], gb[N];
            memcpy(ga, g, sizeof g);
            memcpy(gb, g, sizeof g);
            kd_optim_step(mixed, p, g, 0.1f);
            kd_optim_step(a, pa, ga, 0.1f);
            kd_optim_step(b, pb, gb, 0.1f);
        }
        bool same = true;
        for (int i = 0; i < N; i++) {
            bool exempt = (i >= 2 && i < 6) || i >= 9;
            same = same && p[i] == (exempt ? pb[i] : pa[i]) && pa[i] != pb[i];
        }
        CHECK(same);
        kd_optim_destroy(&mixed);
        kd_optim_destroy(&a);
        kd_optim_destroy(&b);
    }
}

int main(void) {
    test_decay_exemption();
    test_torch_optimizers();
    test_reference_loops();
    test_clipping();
    test_schedules();
    return kd_test_done("test_optim");
}
