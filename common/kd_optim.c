/* kd_optim: SGD (momentum, Nesterov) and AdamW over one flat parameter buffer, global-norm
 * clipping, and learning-rate schedules, following torch.optim and torch.optim.lr_scheduler
 * step for step. An optimizer owns its moment buffers; not thread-safe. */
#include "kd_optim.h"

#include <math.h>
#include <stdlib.h>

#include "kd_util.h"

/* ---- learning-rate schedules ---- */

/* torch.optim.lr_scheduler._annealing_cos */
static double anneal_cos(double start, double end, double pct) {
    return end + (start - end) / 2.0 * (cos(M_PI * pct) + 1.0);
}

/* torch.optim.lr_scheduler.OneCycleLR, two phases, cosine annealing. Steps past the horizon
 * keep the final lr (torch raises); a zero-length phase jumps to its end lr (torch divides by
 * zero). */
static double onecycle_lr(const kd_schedule_config_t *s, long step) {
    double max_lr = s->lr;
    double div = s->div_factor > 0.0f ? s->div_factor : 1.0;
    double final_div = s->final_div_factor > 0.0f ? s->final_div_factor : 1.0;
    double initial_lr = max_lr / div, min_lr = initial_lr / final_div;
    long total = s->total_steps > 1 ? s->total_steps : 1;
    if (step > total - 1) step = total - 1;

    /* pct_start arrives as a float, so end1 may sit ~1e-8 off torch's double; harmless, the
     * two phases meet at max_lr. */
    double end1 = (double)s->pct_start * (double)total - 1.0;
    double end2 = (double)(total - 1);
    double start, end, lr0, lr1;
    if ((double)step <= end1) {
        start = 0.0, end = end1, lr0 = initial_lr, lr1 = max_lr;
    } else {
        start = end1, end = end2, lr0 = max_lr, lr1 = min_lr;
    }
    double pct = end - start > 0.0 ? ((double)step - start) / (end - start) : 1.0;
    return anneal_cos(lr0, lr1, pct);
}

float kd_schedule_lr(const kd_schedule_config_t *s, long step) {
    KD_ASSERT(s && (unsigned)s->kind < KD_SCHED_COUNT);
    if (step < 0) step = 0;
    if (s->kind == KD_SCHED_ONECYCLE) return (float)onecycle_lr(s, step);

    double lr = s->lr;
    long warmup = s->warmup_steps > 0 ? s->warmup_steps : 0;
    if (step < warmup) return (float)(lr * (double)(step + 1) / (double)warmup);
    long t = step - warmup; /* steps into the schedule proper */

    switch (s->kind) {
    case KD_SCHED_CONSTANT:
        return (float)lr;
    case KD_SCHED_STEP:
        if (s->step_size <= 0) return (float)lr;
        return (float)(lr * pow((double)s->gamma, (double)(t / s->step_size)));
    case KD_SCHED_COSINE: {
        long t_max = s->total_steps - warmup;
        double min_lr = s->min_lr;
        if (t_max <= 0 || t >= t_max) return (float)min_lr;
        return (float)(min_lr +
                       (lr - min_lr) * (1.0 + cos(M_PI * (double)t / (double)t_max)) / 2.0);
    }
    default:
        KD_ASSERT(!"unknown schedule");
    }
}

/* ---- optimizers ---- */

kd_optim_t *kd_optim_new(const kd_optim_config_t *cfg, size_t n_params) {
    KD_ASSERT(cfg && (unsigned)cfg->kind < KD_OPT_COUNT);
    kd_optim_t *self = kd_xcalloc(1, sizeof *self);
    self->cfg = *cfg;
    self->n = n_params;
    self->t = 0;
    size_t n_alloc = n_params > 0 ? n_params : 1;
    self->m = kd_alloc_floats(n_alloc);
    self->v = cfg->kind == KD_OPT_ADAMW ? kd_alloc_floats(n_alloc) : NULL;
    return self;
}

void kd_optim_destroy(kd_optim_t **self_p) {
    if (!self_p || !*self_p) return;
    kd_optim_t *self = *self_p;
    free(self->m);
    free(self->v);
    free(self->no_decay);
    free(self);
    *self_p = NULL;
}

void kd_optim_exempt_decay(kd_optim_t *opt, size_t offset, size_t count) {
    KD_ASSERT(opt && offset + count <= opt->n);
    if (count == 0) return;
    if (opt->n_no_decay > 0) {
        kd_param_span_t *last = &opt->no_decay[opt->n_no_decay - 1];
        KD_ASSERT(offset >= last->offset + last->count);
        if (offset == last->offset + last->count) { /* adjacent: one longer span */
            last->count += count;
            return;
        }
    }
    opt->no_decay = realloc(opt->no_decay, (size_t)(opt->n_no_decay + 1) * sizeof *opt->no_decay);
    KD_ASSERT(opt->no_decay);
    opt->no_decay[opt->n_no_decay++] = (kd_param_span_t){offset, count};
}

float kd_l2_norm(const float *x, size_t n) {
    /* Eight independent double lanes: no loop-carried dependency, so the loop vectorises
     * (a single running sum costs milliseconds per step on a million parameters). */
    double lane[8] = {0}, sum = 0.0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) lane[j] += (double)x[i + j] * (double)x[i + j];
    for (; i < n; i++) sum += (double)x[i] * (double)x[i];
    for (int j = 0; j < 8; j++) sum += lane[j];
    return (float)sqrt(sum);
}

/* The update of params [lo, hi) with weight decay wd (step t + 1). */
static void update_span(kd_optim_t *opt, float *params, const float *grads, float lr, size_t lo,
                        size_t hi, float wd) {
    const kd_optim_config_t *c = &opt->cfg;
    float *m = opt->m, *v = opt->v;
    if (c->kind == KD_OPT_SGD) {
        /* torch.optim.SGD with dampening 0. torch starts the buffer as a copy of the first
         * gradient; a zeroed buffer gives the same mu * 0 + g. */
        const float mu = c->momentum;
        /* Three branch-free loops, so each vectorises: this pass is memory-bound and runs on
         * every step of the coordinator. */
        if (mu == 0.0f) {
            for (size_t i = lo; i < hi; i++) params[i] -= lr * (grads[i] + wd * params[i]);
        } else if (c->nesterov) {
            for (size_t i = lo; i < hi; i++) {
                float g = grads[i] + wd * params[i];
                float buf = mu * m[i] + g;
                m[i] = buf;
                params[i] -= lr * (g + mu * buf);
            }
        } else {
            for (size_t i = lo; i < hi; i++) {
                float buf = mu * m[i] + grads[i] + wd * params[i];
                m[i] = buf;
                params[i] -= lr * buf;
            }
        }
    } else {
        /* torch.optim.AdamW (single-tensor path): decay, moments, bias-corrected step. */
        KD_ASSERT(v != NULL);
        const long t = opt->t + 1;
        const float b1 = c->beta1, b2 = c->beta2, eps = c->eps;
        const double bc1 = 1.0 - pow((double)b1, (double)t);
        const double bc2 = 1.0 - pow((double)b2, (double)t);
        const float step_size = (float)((double)lr / bc1);
        const float bc2_sqrt = (float)sqrt(bc2);
        const float decay = (float)(1.0 - (double)lr * (double)wd);
        for (size_t i = lo; i < hi; i++) {
            float g = grads[i];
            params[i] *= decay;
            m[i] = m[i] * b1 + g * (1.0f - b1);
            v[i] = v[i] * b2 + g * g * (1.0f - b2);
            float denom = sqrtf(v[i]) / bc2_sqrt + eps;
            params[i] -= step_size * (m[i] / denom);
        }
    }
}

void kd_optim_update_range(kd_optim_t *opt, float *params, const float *grads, float lr, size_t lo,
                           size_t hi) {
    KD_ASSERT(opt && lo <= hi && hi <= opt->n);
    /* The spans between exemptions take the decay, the exempt ones 0; each cut to [lo, hi). */
    size_t start = 0;
    for (int i = 0; i <= opt->n_no_decay; i++) {
        size_t end = i < opt->n_no_decay ? opt->no_decay[i].offset : opt->n;
        size_t a = start > lo ? start : lo, b = end < hi ? end : hi;
        if (a < b) update_span(opt, params, grads, lr, a, b, opt->cfg.weight_decay);
        if (i == opt->n_no_decay) break;
        start = end + opt->no_decay[i].count;
        a = end > lo ? end : lo, b = start < hi ? start : hi;
        if (a < b) update_span(opt, params, grads, lr, a, b, 0.0f);
    }
}

/* torch.nn.utils.clip_grad_norm_ */
double kd_optim_clip_scale(const kd_optim_t *opt, float norm) {
    if (opt->cfg.clip_norm <= 0.0f) return 1.0;
    const double scale = (double)opt->cfg.clip_norm / (norm + 1e-6);
    return scale < 1.0 ? scale : 1.0;
}

void kd_clip_scale_into(float *dst, const float *grads, size_t n, double scale) {
    for (size_t i = 0; i < n; i++) dst[i] = (float)(grads[i] * scale);
}

void kd_optim_end_step(kd_optim_t *opt) {
    opt->t++;
}

// params (n), grads (n); moments m, v (n)
float kd_optim_step(kd_optim_t *opt, float *params, float *grads, float lr) {
    KD_ASSERT(opt && (opt->n == 0 || (params && grads)));
    const size_t n = opt->n;

    const float norm = kd_l2_norm(grads, n);
    const double scale = kd_optim_clip_scale(opt, norm);
    if (scale < 1.0) kd_clip_scale_into(grads, grads, n, scale);
    kd_optim_update_range(opt, params, grads, lr, 0, n);
    kd_optim_end_step(opt);
    return (float)norm;
}
