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

// d.logp, d.p (C) = log_softmax, softmax of the logits already in d.logp
static void normalize(row_dist_t d, int C) {
    double mx = -INFINITY;
    for (int j = 0; j < C; j++)
        if (d.logp[j] > mx) mx = d.logp[j];
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

// d.logp, d.p (C) = log_softmax, softmax of x (C) / T, in double
static void row_softmax(const float *x, row_dist_t d, int C, double inv_t) {
    for (int j = 0; j < C; j++) d.logp[j] = (double)x[j] * inv_t;
    normalize(d, C);
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

/* The sparse loss works on buckets: one per teacher id, and the rest of the vocabulary as one
 * more (topk). A bucket's logit is the log-sum-exp of its members', so the bucket
 * distributions are softmaxes and row_divergence applies unchanged; its gradient g_b with
 * respect to a bucket logit reaches a member j as g_b * q_j / Q_b (dS_b/ds_j), which is g_b
 * itself for a one-id bucket. */
double kd_loss_sparse_row(const kd_loss_config_t *cfg, const kd_teacher_row_t *t, float *z, int C,
                          int32_t y, float scale, bool grad, kd_loss_stats_t *stats) {
    KD_ASSERT(cfg && t && z && C > 0 && y < C);
    KD_ASSERT(cfg->temperature > 0.0f && cfg->alpha >= 0.0f && cfg->alpha <= 1.0f);
    KD_ASSERT(!t->sampled || cfg->divergence == KD_DIV_FORWARD_KL);
    if (y < 0) {
        if (grad)
            for (int j = 0; j < C; j++) z[j] = 0.0f;
        return 0.0;
    }
    if (!t->ids) { /* a dense row: the dense loss */
        float g_stack[KD_LOSS_STACK_C];
        float *g = C <= KD_LOSS_STACK_C ? g_stack : kd_xmalloc((size_t)C * sizeof *g);
        double loss = kd_loss(cfg, z, t->values, &y, 1, C, grad ? g : NULL, stats);
        if (grad)
            for (int j = 0; j < C; j++) z[j] = g[j] * scale;
        if (g != g_stack) free(g);
        return loss;
    }
    const double T = cfg->temperature, inv_t = 1.0 / T, alpha = cfg->alpha;
    const int n = t->n;
    const bool has_rest = n < C; /* topk: rest_lse is finite then (kd_cache_record_view) */
    const int nb = n + (has_rest ? 1 : 0);
    double stack_buf[7 * (KD_LOSS_STACK_C + 1)];
    double *buf =
        nb <= KD_LOSS_STACK_C ? stack_buf : kd_xmalloc(7 * ((size_t)nb + 1) * sizeof(double));
    const size_t w = (size_t)nb + 1;
    row_dist_t P = {buf, buf + w}, Q = {buf + 2 * w, buf + 3 * w}, M = {buf + 4 * w, buf + 5 * w};
    double *gq = buf + 6 * w;

    /* the student: the full row at T (and at 1 for the cross-entropy) */
    double mx_t = -INFINITY, mx_1 = -INFINITY;
    for (int j = 0; j < C; j++) mx_1 = fmax(mx_1, (double)z[j]);
    mx_t = mx_1 * inv_t;
    double sum_t = 0.0, sum_1 = 0.0, kept_t = 0.0;
    for (int j = 0; j < C; j++) {
        sum_t += exp((double)z[j] * inv_t - mx_t);
        if (T != 1.0) sum_1 += exp((double)z[j] - mx_1);
    }
    if (T == 1.0) sum_1 = sum_t;
    const double lse_t = mx_t + log(sum_t), lse_1 = mx_1 + log(sum_1);
    for (int b = 0; b < n; b++) {
        Q.logp[b] = (double)z[t->ids[b]] * inv_t;
        kept_t += exp(Q.logp[b] - mx_t);
    }
    /* the rest's mass without cancellation beyond what sum_t - kept_t loses */
    const double rest_t = sum_t - kept_t;
    if (nb > n) Q.logp[n] = rest_t > 0.0 ? mx_t + log(rest_t) : -INFINITY;
    normalize(Q, nb);

    /* the teacher */
    int t_top = 0;
    if (t->sampled) {
        double total = 0.0;
        for (int b = 0; b < n; b++) total += t->values[b];
        for (int b = 0; b < n; b++) {
            P.p[b] = t->values[b] / total;
            P.logp[b] = log(P.p[b]);
            if (t->values[b] > t->values[t_top]) t_top = b;
        }
        if (has_rest) { /* never drawn: no teacher mass; the divergence skips p = 0 terms */
            P.p[n] = 0.0;
            P.logp[n] = -INFINITY;
        }
    } else {
        for (int b = 0; b < n; b++) P.logp[b] = (double)t->values[b] * inv_t;
        /* the rest's C - n classes share exp(rest_lse) equally: log((C-n) e^((lse - log(C-n))/T))
         */
        if (nb > n) {
            double lr = log((double)(C - n));
            P.logp[n] = lr + ((double)t->rest_lse - lr) * inv_t;
        }
        normalize(P, nb);
        for (int b = 1; b < n; b++)
            if (t->values[b] > t->values[t_top]) t_top = b;
    }

    const double kd = T * T * row_divergence(cfg->divergence, P, Q, M, nb, grad ? gq : NULL);
    const double ce = lse_1 - (double)z[y];
    const double loss = alpha * kd + (1.0 - alpha) * ce;
    int am = 0;
    for (int j = 1; j < C; j++)
        if (z[j] > z[am]) am = j;
    if (stats) {
        stats->loss_sum += loss;
        stats->ce_sum += ce;
        stats->kd_sum += kd;
        stats->correct += am == y;
        stats->agree += (uint32_t)am == t->ids[t_top];
        stats->count += 1;
    }
    if (grad) {
        /* d(T^2 D)/dz = T * dD/ds; members of the rest bucket get their share of g_rest */
        const double w_ce = (1.0 - alpha) * scale, w_kd = alpha * T * scale;
        const double rest_w = has_rest && Q.p[n] > 1e-300 ? gq[n] / Q.p[n] : 0.0;
        /* keep the kept ids' logits: z is overwritten in place */
        double *zk = M.p; /* M is free after row_divergence */
        for (int b = 0; b < n; b++) zk[b] = (double)z[t->ids[b]];
        for (int j = 0; j < C; j++) {
            const double q_t = exp((double)z[j] * inv_t - lse_t);
            const double p_1 = T == 1.0 ? q_t : exp((double)z[j] - lse_1);
            z[j] = (float)(w_ce * (p_1 - (j == y ? 1.0 : 0.0)) + w_kd * rest_w * q_t);
        }
        for (int b = 0; b < n; b++) {
            const int j = (int)t->ids[b];
            const double p_1 = exp(zk[b] - lse_1);
            z[j] = (float)(w_ce * (p_1 - (j == y ? 1.0 : 0.0)) + w_kd * gq[b]);
        }
    }
    if (buf != stack_buf) free(buf);
    return loss;
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
