/* kd_loss: cross-entropy and the distillation divergences of DESIGN §1, row by row in double
 * through log-softmax, so extreme logits and temperatures stay finite and p = 0 terms vanish.
 * Pure functions, thread-safe; scratch lives on the stack unless C is large. */
#include "kd_loss.h"

#include <math.h>
#include <stdlib.h>

#include "kd_util.h"

/* Rows of up to this many classes use the stack; larger vocabularies get one malloc a call. */
#define KD_LOSS_STACK_C 128
#define KD_LOSS_SCRATCH 9 /* rows of C doubles per call */

/* A row's distribution, kept both ways so no exp is computed twice. */
typedef struct {
    double *logp; /* (C) log-softmax */
    double *p;    /* (C) softmax; exactly 0 where it underflows, logp stays finite */
} row_dist_t;

// d.logp, d.p (C) = log_softmax, softmax of x (C) / T, in double
static void row_softmax(const float *x, row_dist_t d, int C, double inv_t) {
    double mx = -INFINITY;
    for (int j = 0; j < C; j++) {
        d.logp[j] = (double)x[j] * inv_t;
        if (d.logp[j] > mx) mx = d.logp[j];
    }
    double sum = 0.0;
    for (int j = 0; j < C; j++) {
        d.p[j] = exp(d.logp[j] - mx);
        sum += d.p[j];
    }
    double lse = mx + log(sum), inv_sum = 1.0 / sum;
    for (int j = 0; j < C; j++) {
        d.logp[j] -= lse;
        d.p[j] *= inv_sum;
    }
}

static int row_argmax(const float *x, int C) {
    int best = 0;
    for (int j = 1; j < C; j++) {
        if (x[j] > x[best]) best = j;
    }
    return best;
}

/* log(exp(a) + exp(b)) without overflow; exact when one side is -inf. */
static double log_add_exp(double a, double b) {
    double mx = a > b ? a : b;
    double mn = a > b ? b : a;
    return mx + log1p(exp(mn - mx));
}

/* KL(a || b); a term with a.p == 0 contributes 0 (and never 0 * inf: logs stay finite). */
static double row_kl(row_dist_t a, row_dist_t b, int C) {
    double kl = 0.0;
    for (int j = 0; j < C; j++) {
        if (a.p[j] > 0.0) kl += a.p[j] * (a.logp[j] - b.logp[j]);
    }
    return kl;
}

/* Divergence between teacher p and student q for one row and, when gq is not NULL,
 * dD/d(s/T) into gq (C). m: scratch row for JS. */
static double row_divergence(kd_divergence_t div, row_dist_t p, row_dist_t q, row_dist_t m, int C,
                             double *gq) {
    double d = 0.0;
    switch (div) {
    case KD_DIV_FORWARD_KL:
        d = row_kl(p, q, C);
        // dKL(p||q)/db = q - p
        if (gq)
            for (int j = 0; j < C; j++) gq[j] = q.p[j] - p.p[j];
        break;
    case KD_DIV_REVERSE_KL:
        d = row_kl(q, p, C);
        // dKL(q||p)/db_j = q_j (log q_j - log p_j - KL)
        if (gq)
            for (int j = 0; j < C; j++) gq[j] = q.p[j] * (q.logp[j] - p.logp[j] - d);
        break;
    case KD_DIV_SYMMETRIC_KL: {
        double fwd = row_kl(p, q, C), rev = row_kl(q, p, C);
        d = 0.5 * (fwd + rev);
        if (gq)
            for (int j = 0; j < C; j++)
                gq[j] = 0.5 * ((q.p[j] - p.p[j]) + q.p[j] * (q.logp[j] - p.logp[j] - rev));
        break;
    }
    case KD_DIV_JS: {
        for (int j = 0; j < C; j++) {
            m.p[j] = 0.5 * (p.p[j] + q.p[j]);
            /* log m from the log-probabilities where m underflows, so it stays finite. */
            m.logp[j] = m.p[j] > 1e-300 ? log(m.p[j]) : log_add_exp(p.logp[j], q.logp[j]) - M_LN2;
        }
        d = 0.5 * (row_kl(p, m, C) + row_kl(q, m, C));
        /* The terms through m cancel (p + q = 2m), leaving dD/db_j = q_j (g_j - E_q[g]) / 2
         * with g = log q - log m. */
        if (gq) {
            double eg = 0.0;
            for (int j = 0; j < C; j++) eg += q.p[j] * (q.logp[j] - m.logp[j]);
            for (int j = 0; j < C; j++) gq[j] = 0.5 * q.p[j] * ((q.logp[j] - m.logp[j]) - eg);
        }
        break;
    }
    default:
        KD_ASSERT(!"unknown divergence");
    }
    /* Rounding can leave a tiny negative value for near-identical rows; a divergence is >= 0. */
    return d > 0.0 ? d : 0.0;
}

float kd_loss(const kd_loss_config_t *cfg, const float *logits, const float *teacher,
              const int32_t *labels, int B, int C, float *dlogits, kd_loss_stats_t *stats) {
    KD_ASSERT(cfg && logits && labels && B > 0 && C > 0);
    KD_ASSERT(cfg->temperature > 0.0f && cfg->alpha >= 0.0f && cfg->alpha <= 1.0f);
    KD_ASSERT(cfg->alpha == 0.0f || teacher != NULL);
    KD_ASSERT((unsigned)cfg->divergence < KD_DIV_COUNT);

    const double T = cfg->temperature, alpha = cfg->alpha;
    const double inv_t = 1.0 / T, t2 = T * T, inv_b = 1.0 / B;
    const bool with_kd = teacher != NULL;

    /* Scratch rows: softmax of s, s/T, t/T and m (JS), two doubles each, and the gradient. */
    double stack_buf[KD_LOSS_SCRATCH * KD_LOSS_STACK_C];
    double *buf =
        C <= KD_LOSS_STACK_C ? stack_buf : kd_xmalloc(KD_LOSS_SCRATCH * (size_t)C * sizeof(double));
    size_t c = (size_t)C;
    row_dist_t ds_ce = {buf, buf + c}, dq = {buf + 2 * c, buf + 3 * c};
    row_dist_t dp = {buf + 4 * c, buf + 5 * c}, dm = {buf + 6 * c, buf + 7 * c};
    double *gq = buf + 8 * c;
    if (T == 1.0) dq = ds_ce; /* s/T is s: one softmax serves both terms */

    double loss_sum = 0.0, ce_sum = 0.0, kd_sum = 0.0;
    int correct = 0, agree = 0;
    for (int b = 0; b < B; b++) {
        const float *s = logits + (size_t)b * C; // s (C)
        int32_t y = labels[b];
        KD_ASSERT(y >= 0 && y < C);

        row_softmax(s, ds_ce, C, 1.0);
        double ce = -ds_ce.logp[y];
        double kd = 0.0;
        if (with_kd) {
            const float *t = teacher + (size_t)b * C; // t (C)
            if (T != 1.0) row_softmax(s, dq, C, inv_t);
            row_softmax(t, dp, C, inv_t);
            kd = t2 * row_divergence(cfg->divergence, dp, dq, dm, C, dlogits ? gq : NULL);
        }
        double loss = alpha * kd + (1.0 - alpha) * ce;
        loss_sum += loss;
        ce_sum += ce;
        kd_sum += kd;

        int am = row_argmax(s, C);
        correct += am == y;
        if (with_kd) agree += am == row_argmax(teacher + (size_t)b * C, C);

        if (dlogits) {
            float *ds = dlogits + (size_t)b * C; // ds (C)
            // d(T^2 D)/ds = T^2 * dD/d(s/T) / T = T * gq
            double w_ce = (1.0 - alpha) * inv_b, w_kd = alpha * T * inv_b;
            for (int j = 0; j < C; j++) {
                double g = w_ce * (ds_ce.p[j] - (j == y ? 1.0 : 0.0));
                if (with_kd && alpha > 0.0) g += w_kd * gq[j];
                ds[j] = (float)g;
            }
        }
    }
    if (buf != stack_buf) free(buf);

    if (stats) {
        stats->loss_sum += loss_sum;
        stats->ce_sum += ce_sum;
        stats->kd_sum += kd_sum;
        stats->correct += correct;
        stats->agree += agree;
        stats->count += B;
    }
    return (float)(loss_sum * inv_b);
}

void kd_log_softmax(const float *x, float *out, int B, int C, float T) {
    KD_ASSERT(x && out && B >= 0 && C > 0 && T > 0.0f);
    double stack_buf[2 * KD_LOSS_STACK_C];
    double *buf = C <= KD_LOSS_STACK_C ? stack_buf : kd_xmalloc(2 * (size_t)C * sizeof(double));
    row_dist_t row = {buf, buf + C};
    for (int b = 0; b < B; b++) {
        row_softmax(x + (size_t)b * C, row, C, 1.0 / (double)T); // row (C)
        for (int j = 0; j < C; j++) out[(size_t)b * C + j] = (float)row.logp[j];
    }
    if (buf != stack_buf) free(buf);
}
