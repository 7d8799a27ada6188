/* kd_loss: the losses of DESIGN §1 with analytic gradients — cross-entropy on hard labels,
 * and the distillation divergences between temperature-softened teacher and student
 * distributions, mixed as  loss = alpha * T^2 * D + (1 - alpha) * CE.  Everything goes through
 * log-softmax (log-sum-exp), so logits of +-100 and T up to 20 stay finite. Pure functions;
 * thread-safe. */
#ifndef KD_LOSS_H
#define KD_LOSS_H

#include <stdbool.h>
#include <stdint.h>

typedef enum {
    KD_DIV_FORWARD_KL = 0, /* KL(p_t || q_s), Hinton et al. */
    KD_DIV_REVERSE_KL,     /* KL(q_s || p_t) */
    KD_DIV_SYMMETRIC_KL,   /* (KL(p_t||q_s) + KL(q_s||p_t)) / 2 */
    KD_DIV_JS,             /* (KL(p_t||m) + KL(q_s||m)) / 2, m = (p_t + q_s) / 2 */
    KD_DIV_COUNT
} kd_divergence_t;

const char *kd_divergence_name(kd_divergence_t d); /* "forward_kl", ... as in recipes */
int kd_divergence_parse(const char *name, kd_divergence_t *out);

typedef struct {
    kd_divergence_t divergence;
    float temperature; /* T > 0 */
    float alpha;       /* weight of the distillation term, [0, 1]; 0 = plain supervised */
} kd_loss_config_t;

/* Per-batch sums, so callers can aggregate over batches of different sizes. */
typedef struct {
    double loss_sum; /* sum over samples of the mixed loss */
    double ce_sum;   /* sum of cross-entropy */
    double kd_sum;   /* sum of T^2 * divergence (0 when no teacher) */
    int correct;     /* argmax(student) == label */
    int agree;       /* argmax(student) == argmax(teacher) (0 when no teacher) */
    int count;
} kd_loss_stats_t;

/* logits (B,C) student; teacher (B,C) raw teacher logits, or NULL when alpha == 0;
 * labels (B) in [0, C). Returns the mean loss over the batch. When dlogits (B,C) is not NULL
 * it receives d(mean loss)/d(logits). stats (may be NULL) is accumulated (+=). */
float kd_loss(const kd_loss_config_t *cfg, const float *logits, const float *teacher,
              const int32_t *labels, int B, int C, float *dlogits, kd_loss_stats_t *stats);

/* One position's teacher as a sparse cache record gives it (kd_cache_record_view). */
typedef struct {
    int n;          /* entries in ids and values; the class count for a dense row */
    uint32_t *ids;  /* (n) the classes; NULL for a dense row (class i = entry i) */
    float *values;  /* (n) raw logits (dense, topk) or counts of draws (sampled) */
    float rest_lse; /* topk: log-sum-exp of the logits not kept (-inf when none); else -inf */
    bool sampled;   /* values count draws from the teacher at the loss's temperature */
} kd_teacher_row_t;

/* The mixed loss of one position against a sparse teacher: student logits z (C), target y
 * (< 0: the position does not count: 0, and a zero gradient). The teacher's distribution is
 * over buckets: each id, and for topk the rest as one more (its logits taken equal, sharing
 * exp(rest_lse)), so D stays a proper divergence and T changes without recomputing; sampled
 * rows are the empirical distribution of the draws, whose forward KL gradient (q - counts / n)
 * is an unbiased estimate of the dense one (only forward_kl: the others are not linear in the
 * teacher). The student's side is its full log-softmax gathered at the ids. With grad, z is
 * overwritten with scale * d(loss)/dz. stats (may be NULL) += this position. */
double kd_loss_sparse_row(const kd_loss_config_t *cfg, const kd_teacher_row_t *t, float *z, int C,
                          int32_t y, float scale, bool grad, kd_loss_stats_t *stats);

/* Row-wise log-softmax of x (B,C) / T into out (B,C). */
void kd_log_softmax(const float *x, float *out, int B, int C, float T);

#endif
